"""The distilled weak model as a file llama.cpp serves: the base GGUF with the adapters merged.

Only the adapted matrices change: each becomes dequantize(base) + ΔW, stored as Q8_0 (gguf-py
cannot write the K-quants, and a 4-bit grid is too coarse to keep a small ΔW). Everything else
(tokenizer, metadata, the embeddings, norms) is the base file's bytes, so the tokenizer and the
chat template are the same by construction. The file is named by its sha256 and written next to
a manifest saying where it came from; a new weak model is a new codec fingerprint.

    distilled/weak-<sha256[:16]>.gguf
    distilled/weak-<sha256[:16]>.json   {"sha256", "base_sha256", "train", "result", ...}
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor

from uplimit.errors import ConfigError
from uplimit.models.gguf_names import gguf_name
from uplimit.models.gguf_write import Replacement, dequantized, rewrite_gguf
from uplimit.models.store import sha256_file, uplimit_home


@dataclass(frozen=True)
class Exported:
    path: Path
    sha256: str
    manifest: Path


def distilled_dir() -> Path:
    return uplimit_home() / "models" / "distilled"


def export_distilled(
    base: str | Path,
    base_sha256: str,
    deltas: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    *,
    qtype: GGMLQuantizationType = GGMLQuantizationType.Q8_0,
    manifest: Mapping[str, Any] | None = None,
) -> Exported:
    """Write `base` (its sha256 is what loading it already computed) with each module's ΔW
    (by Hugging Face module name) added to its weight."""
    base, out_dir = Path(base), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {t.name: t for t in GGUFReader(base).tensors}
    replace = {}
    for module, delta in deltas.items():
        name = gguf_name(f"{module}.weight")
        if name not in tensors:
            raise ConfigError(f"{base} has no tensor {name} for {module}")
        replace[name] = Replacement(qtype, functools.partial(_merged, tensors[name], delta))
    staging = out_dir / f".export-{os.getpid()}.gguf"
    rewrite_gguf(base, staging, replace)
    sha256 = sha256_file(staging)
    path = out_dir / f"weak-{sha256[:16]}.gguf"
    os.replace(staging, path)
    info = {"sha256": sha256, "base": str(base), "base_sha256": base_sha256}
    info |= {"qtype": qtype.name, "adapted_tensors": len(replace), **(manifest or {})}
    manifest_path = path.with_suffix(".json")
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    return Exported(path, sha256, manifest_path)


def _merged(tensor: ReaderTensor, delta: torch.Tensor) -> np.ndarray:
    values = dequantized(tensor)
    if values.shape != tuple(delta.shape):
        raise ConfigError(f"{tensor.name}: ΔW is {tuple(delta.shape)}, weight is {values.shape}")
    return values + delta.numpy()


def list_distilled(directory: str | Path | None = None) -> list[dict[str, Any]]:
    """The manifests of the distilled weak models in `directory`, oldest first."""
    directory = Path(directory) if directory else distilled_dir()
    manifests = sorted(directory.glob("weak-*.json"), key=lambda p: p.stat().st_mtime)
    return [{"path": str(p.with_suffix(".gguf")), **json.loads(p.read_text())} for p in manifests]
