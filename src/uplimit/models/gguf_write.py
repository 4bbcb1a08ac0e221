"""Write a GGUF file that is a copy of another with some tensors replaced.

Everything else (metadata, tokenizer, tensor order, untouched tensors' bytes) is copied. Tensors
are produced and written one at a time, so a model larger than memory can be rewritten:

    rewrite_gguf(src, dst, {
        "blk.0.ffn_up.weight": Replacement(GGMLQuantizationType.F16, lambda: new_values),
    }, metadata={"general.file_type": (1, GGUFValueType.UINT32)})

Values are float arrays in numpy order, the shape `dequantized()` returns: (rows, columns) for
a matrix, i.e. ggml's ne reversed, which for Qwen2 is the Hugging Face parameter's shape. They
are converted to the replacement's ggml type by `gguf.quants.quantize` (F32, F16, BF16, Q8_0,
Q4_0, ...; not the K-quants, which gguf-py cannot quantize). `dst` appears atomically.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderTensor

from uplimit.errors import ConfigError

__all__ = ["Replacement", "dequantized", "rewrite_gguf"]

FloatArray = npt.NDArray[np.floating]


@dataclass(frozen=True)
class Replacement:
    """A tensor's new ggml type and values (an array, or a function called when it is written)."""

    qtype: GGMLQuantizationType
    values: FloatArray | Callable[[], FloatArray]


def dequantized(tensor: ReaderTensor) -> npt.NDArray[np.float32]:
    """A tensor's values as a writable float32 array in numpy order (ggml ne reversed)."""
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    values = np.require(values, np.float32, "W")  # F32 tensors come back as read-only views
    return values.reshape(tuple(reversed(tensor.shape.tolist())))


def rewrite_gguf(
    src: str | Path,
    dst: str | Path,
    replace: Mapping[str, Replacement],
    *,
    metadata: Mapping[str, tuple[Any, GGUFValueType]] | None = None,
) -> None:
    """Copy `src` to `dst`, writing the tensors named in `replace` with their new types and
    values, and setting (adding or overwriting) the `metadata` keys.

    ConfigError if a name is not in `src` or a replacement's shape differs from the original.
    """
    src, dst = Path(src), Path(dst)
    reader = GGUFReader(src)
    by_name = {t.name: t for t in reader.tensors}
    unknown = set(replace) - set(by_name)
    if unknown:
        raise ConfigError(f"{src} has no tensor(s) {', '.join(sorted(unknown))}")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch is None:
        raise ConfigError(f"{src} has no general.architecture")

    staging = dst.with_name(f".staging-{os.getpid()}-{dst.name}")
    writer = gguf.GGUFWriter(staging, arch=arch.contents(), endianess=reader.endianess)
    try:
        alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
        if alignment is not None:
            writer.data_alignment = alignment.contents()
        for field in reader.fields.values():
            # GGUF.* are the reader's virtual fields; the writer adds the architecture itself.
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            if metadata and field.name in metadata:
                continue
            kind = field.types[0]
            sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
        for key, (value, kind) in (metadata or {}).items():
            writer.add_key_value(key, value, kind)

        for t in reader.tensors:
            shape = tuple(reversed(t.shape.tolist()))  # numpy order
            if t.name in replace:
                qtype = replace[t.name].qtype
                byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
                nbytes = int(np.prod(byte_shape))
                writer.add_tensor_info(t.name, shape, np.dtype(np.float32), nbytes, qtype)
            else:
                writer.add_tensor_info(
                    t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type
                )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            if t.name in replace:
                writer.write_tensor_data(_encode(replace[t.name], t))
            else:
                writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        writer.close()
        os.replace(staging, dst)
    finally:
        writer.close()
        staging.unlink(missing_ok=True)


def _encode(rep: Replacement, original: ReaderTensor) -> np.ndarray:
    values = rep.values() if callable(rep.values) else rep.values
    expected = tuple(reversed(original.shape.tolist()))
    if tuple(values.shape) != expected:
        raise ConfigError(f"{original.name}: replacement shape {values.shape}, expected {expected}")
    return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), rep.qtype)
