"""A GGUF file's hash for the codec fingerprint: the pinned one when the file is the store's,
else the file's own, also where the store is another user's (a confined inner's view)."""

from __future__ import annotations

import hashlib

from uplimit.models import llama, store


def test_a_store_this_user_cannot_read_falls_back_to_hashing_the_file(tmp_path, monkeypatch):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"weights" * 1000)

    def denied(spec, **_):
        raise PermissionError(13, "Permission denied", str(store.model_path(spec)))

    monkeypatch.setattr(store, "status", denied)
    assert llama._file_sha256(model) == hashlib.sha256(b"weights" * 1000).hexdigest()
