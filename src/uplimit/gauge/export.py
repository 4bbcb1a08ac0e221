"""A gauged serving copy for llama.cpp: a GGUF file whose weights are in a new gauge.

The strong model is served from a quantized GGUF (Q4_K_M). Its K-quant blocks run along each
row's input axis (256 values sharing scales), so a gauge that permutes or negates columns
(every matrix, once the residual stream moves) cannot be written back into the same blocks.
So the copy is written in a float type, from the dequantized values:

- F16 (default): each value is rounded to F16 once, by `astype` (round to nearest even), and
  rounding one value at a time commutes with moving and negating values. So the gauged F16 copy
  holds exactly the values of the ungauged F16 copy, moved: it computes the same function as
  `export_gguf(src, dst, None)` up to summation order in llama.cpp's matmuls. The F16 copy is
  itself not bit-for-bit the Q4_K_M model: Q4_K values d*sc*q - dmin*m need up to ~21
  significant bits, F16 keeps 11 (docs/gauge.md has the measured difference).
- F32: holds the dequantized values exactly; twice the size.

Gauges compose and moving values is exact, so a serving copy can be re-gauged from the previous
copy (`src` may be an F16 copy) with no drift; the master Q4_K_M file is needed only once.
Only the `qwen2` architecture is accepted: llama.cpp stores its weights in Hugging Face layout
(Llama files permute Q/K rows for rotary embeddings, which the gauge's rotary-pair signs would
have to follow).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from uplimit.errors import ConfigError
from uplimit.gauge.transform import Dims, Gauge, random_gauge
from uplimit.models.gguf_names import hf_name
from uplimit.models.gguf_write import Replacement, dequantized, rewrite_gguf
from uplimit.models.store import sha256_file

__all__ = ["DTYPES", "Exported", "export_gguf", "gauge_gguf", "gguf_dims"]

# Serving-copy types: exact under gauges (module docstring). general.file_type says which.
DTYPES = {
    "f16": (GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "f32": (GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
}


@dataclass(frozen=True)
class Exported:
    """What `export_gguf` wrote: the file, its sha256 (what audits name), and timings."""

    path: Path
    sha256: str
    gauge_digest: str | None  # None: an ungauged copy
    seconds: float


def gguf_dims(reader: GGUFReader) -> Dims:
    """The gauge axes of a GGUF file (its metadata), for `random_gauge`; qwen2 only."""
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch is None or arch.contents() != "qwen2":
        found = None if arch is None else arch.contents()
        raise ConfigError(f"gauged GGUF export supports the qwen2 architecture, not {found!r}")

    def key(name: str, default: int | None = None) -> int:
        field = reader.get_field(f"qwen2.{name}")
        if field is None:
            if default is None:
                raise ConfigError(f"GGUF metadata has no qwen2.{name}")
            return default
        return int(field.contents())

    hidden, n_heads = key("embedding_length"), key("attention.head_count")
    return Dims(
        n_layers=key("block_count"),
        hidden=hidden,
        intermediate=key("feed_forward_length"),
        n_heads=n_heads,
        n_kv_heads=key("attention.head_count_kv", n_heads),
        head_dim=key("attention.key_length", hidden // n_heads),
    )


def export_gguf(
    src: str | Path, dst: str | Path, gauge: Gauge | None, *, dtype: str = "f16"
) -> Exported:
    """Write `src` with every weight in `gauge` (None: unchanged) as a `dtype` GGUF at `dst`.

    Matrices are written as `dtype`; vectors (norms, biases) as F32, as llama.cpp's converter
    does. Metadata and tokenizer are copied. One tensor is in memory at a time.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    qtype, file_type = DTYPES[dtype]
    start = time.perf_counter()
    reader = GGUFReader(src)
    dims = gguf_dims(reader)
    if gauge is not None and gauge.dims != dims:
        raise ConfigError(f"gauge drawn for {gauge.dims}, {src} has {dims}")

    def values(tensor: gguf.ReaderTensor, name: str) -> torch.Tensor:
        x = torch.from_numpy(dequantized(tensor))
        return x if gauge is None else gauge.relabel(name, x)

    replace = {}
    for t in reader.tensors:
        name = hf_name(t.name)  # ConfigError for a tensor with no known gauge axes
        kind = qtype if len(t.shape) > 1 else GGMLQuantizationType.F32
        replace[t.name] = Replacement(kind, lambda t=t, name=name: values(t, name).numpy())
    metadata = {gguf.Keys.General.FILE_TYPE: (int(file_type), GGUFValueType.UINT32)}
    rewrite_gguf(src, dst, replace, metadata=metadata)
    digest = None if gauge is None else gauge.digest()
    return Exported(Path(dst), sha256_file(Path(dst)), digest, time.perf_counter() - start)


def gauge_gguf(
    src: str | Path,
    dst: str | Path,
    seed: int,
    *,
    dtype: str = "f16",
    residual: bool = True,
    signs: bool = True,
) -> Exported:
    """`export_gguf` with `random_gauge(seed)` drawn for `src`'s dimensions.

    The seed is secret (it undoes the gauge) and is written nowhere.
    """
    dims = gguf_dims(GGUFReader(src))
    gauge = random_gauge(dims, seed, residual=residual, signs=signs)
    return export_gguf(src, dst, gauge, dtype=dtype)
