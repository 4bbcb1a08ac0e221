"""The bytes each token of a GGUF file stands for, as llama.cpp sees them, read without llama.cpp.

`LanguageModel.vocab_digest()` compares tokenizers by the bytes of every token. A backend that
loads a GGUF file through another library (`HFModel`) must report the bytes llama.cpp would, or
one file gets two digests. This module reads the vocabulary from the file's metadata and applies
the rules of llama.cpp's `token_to_piece(..., special=true)` (src/llama-vocab.cpp, as vendored
by llama-cpp-python 0.3.36), by token type:

    CONTROL, UNKNOWN, USER_DEFINED   the stored text
    NORMAL                           "gpt2" (byte-level BPE): through the GPT-2 byte<->unicode map
                                     "llama" (SentencePiece): "▁" -> " "
    BYTE                             the one byte spelled <0xNN>
    UNUSED, UNDEFINED                nothing

Converters disagree on the padding ids past a tokenizer's end (older ones wrote them as
USER_DEFINED "[PAD151646]", newer ones as UNUSED), which is why the types are read from the
file rather than guessed from a Hugging Face tokenizer.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from uplimit.errors import ConfigError

# GGUF token types (gguf-py `TokenType`).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# GGUF metadata value types: fixed-width scalars by struct format; 8 = string, 9 = array.
_SCALAR = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",
    6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9
_WANTED = ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type")


def _gpt2_byte_map() -> dict[str, int]:
    """GPT-2's byte-level alphabet: every byte as a printable character, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


_UNICODE_TO_BYTE = _gpt2_byte_map()


def byte_level_bytes(piece: str) -> bytes:
    """The bytes behind a byte-level BPE token string (e.g. "Ġthe" -> b" the").

    A character outside the map (no byte-level vocabulary has one) is kept as its UTF-8.
    """
    out = bytearray()
    for char in piece:
        byte = _UNICODE_TO_BYTE.get(char)
        if byte is None:
            out += char.encode("utf-8")
        else:
            out.append(byte)
    return bytes(out)


def gguf_token_bytes(path: str | Path) -> list[bytes]:
    """Every token's bytes, in id order, per the rules in the module docstring."""
    model, tokens, types = _read_vocab(Path(path))
    if model not in ("gpt2", "llama"):
        raise ConfigError(f"{path}: tokenizer model {model!r} is not supported (gpt2, llama)")
    pieces = []
    for text, kind in zip(tokens, types, strict=True):
        if kind in (CONTROL, UNKNOWN, USER_DEFINED):
            pieces.append(text)
        elif kind == NORMAL and model == "gpt2":
            pieces.append(byte_level_bytes(text.decode("utf-8")))
        elif kind == NORMAL:
            pieces.append(text.replace("▁".encode(), b" "))
        elif kind == BYTE:
            pieces.append(bytes([int(text[3:5], 16)]))  # b"<0x0A>" -> b"\n"
        else:
            pieces.append(b"")
    return pieces


def _read_vocab(path: Path) -> tuple[str, list[bytes], list[int]]:
    """(tokenizer model, token texts, token types) from the metadata; tensors are not touched.

    Walks the key-value section with `struct` over a memory map: ~0.3 s for Qwen2's 152k
    tokens and 151k merges, where gguf-py's `GGUFReader` takes ~16 s.
    """
    try:
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse_vocab(buf, path)
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a readable GGUF file ({e})") from e


def _parse_vocab(buf: mmap.mmap, path: Path) -> tuple[str, list[bytes], list[int]]:
    if buf[:4] != b"GGUF":
        raise ConfigError(f"{path}: no GGUF magic")
    version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):  # v1 used 32-bit counts
        raise ConfigError(f"{path}: GGUF version {version} is not supported (2, 3)")
    pos = 24
    found: dict[str, object] = {}
    for _ in range(n_kv):
        key, pos = _read_string(buf, pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        value, pos = _read_value(buf, pos + 4, kind, keep=key.decode() in _WANTED)
        if value is not None:
            found[key.decode()] = value
    missing = [key for key in _WANTED if key not in found]
    if missing:
        raise ConfigError(f"{path}: GGUF metadata lacks {', '.join(missing)}")
    model, tokens, types = (found[key] for key in _WANTED)
    if not (isinstance(model, bytes) and isinstance(tokens, list) and isinstance(types, list)):
        raise ConfigError(f"{path}: tokenizer metadata has unexpected value types")
    if len(tokens) != len(types):
        raise ConfigError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
    return model.decode(), tokens, types


def _read_string(buf: mmap.mmap, pos: int) -> tuple[bytes, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    pos += 8
    return buf[pos : pos + length], pos + length


def _read_value(buf: mmap.mmap, pos: int, kind: int, *, keep: bool) -> tuple[object, int]:
    """One metadata value (None unless `keep`) and the position just past it."""
    if kind in _SCALAR:
        size = struct.calcsize(_SCALAR[kind])
        return (struct.unpack_from(_SCALAR[kind], buf, pos)[0] if keep else None), pos + size
    if kind == _STRING:
        text, end = _read_string(buf, pos)
        return (text if keep else None), end
    if kind != _ARRAY:
        raise ConfigError(f"unknown GGUF metadata type {kind}")
    item_kind, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item_kind in _SCALAR:
        fmt = _SCALAR[item_kind]
        end = pos + count * struct.calcsize(fmt)
        return (list(struct.unpack_from(f"<{count}{fmt[1]}", buf, pos)) if keep else None), end
    if item_kind != _STRING:
        raise ConfigError(f"unsupported GGUF array of type {item_kind}")
    if not keep:  # length-prefixed, so even skipping means walking
        for _ in range(count):
            pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
        return None, pos
    items = []
    for _ in range(count):
        text, pos = _read_string(buf, pos)
        items.append(text)
    return items, pos
