"""gguf_token_bytes: llama.cpp's token_to_piece rules, read from metadata-only GGUF files."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from uplimit.errors import ConfigError
from uplimit.models import gguf_vocab
from uplimit.models.gguf_vocab import CONTROL, NORMAL, UNUSED, USER_DEFINED, gguf_token_bytes
from uplimit.models.hf import HFModel


def write_vocab(path: Path, model: str, tokens: list[str], types: list[int]) -> Path:
    writer = gguf.GGUFWriter(str(path), arch="qwen2")
    # Keys of other types before and after the vocabulary, so the reader must skip them.
    writer.add_uint32("test.count", 7)
    writer.add_float32("test.scale", 0.5)
    writer.add_array("test.sections", [1, 2, 3])
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_merges(["a b", "ab c"])
    writer.add_token_types(types)
    writer.add_bool("test.flag", True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_as_gguf(model: HFModel, path: Path, pad_type: int) -> Path:
    """The tiny tokenizer as convert_hf_to_gguf.py writes it, padded to the logits width."""
    tokenizer = model.tokenizer
    tokens = tokenizer.convert_ids_to_tokens(range(len(tokenizer)))
    special = set(tokenizer.added_tokens_decoder)
    types = [CONTROL if i in special else NORMAL for i in range(len(tokens))]
    for i in range(len(tokens), model.info.n_vocab):
        tokens.append(f"[PAD{i}]")
        types.append(pad_type)
    return write_vocab(path, "gpt2", tokens, types)


def test_matches_hf_view_of_the_same_tokenizer(tiny_strong: HFModel, tmp_path: Path) -> None:
    """Newer converters mark padding ids UNUSED: llama.cpp gives them no bytes, as HFModel does."""
    pieces = gguf_token_bytes(tiny_as_gguf(tiny_strong, tmp_path / "v.gguf", UNUSED))
    assert pieces == [tiny_strong.token_bytes(t) for t in range(tiny_strong.info.n_vocab)]


def test_user_defined_padding_keeps_its_text(tiny_strong: HFModel, tmp_path: Path) -> None:
    """Older converters wrote padding ids as USER_DEFINED, which llama.cpp renders as text."""
    pieces = gguf_token_bytes(tiny_as_gguf(tiny_strong, tmp_path / "v.gguf", USER_DEFINED))
    last = tiny_strong.info.n_vocab - 1
    assert pieces[last] == f"[PAD{last}]".encode()


def test_sentencepiece_rules(tmp_path: Path) -> None:
    tokens = ["<unk>", "<s>", "<0x0A>", "▁the", "ing", "<unused0>", "<start_of_turn>"]
    types = [2, CONTROL, 6, NORMAL, NORMAL, UNUSED, USER_DEFINED]
    pieces = gguf_token_bytes(write_vocab(tmp_path / "spm.gguf", "llama", tokens, types))
    assert pieces == [b"<unk>", b"<s>", b"\n", b" the", b"ing", b"", b"<start_of_turn>"]


def test_byte_level_map_covers_every_byte() -> None:
    alphabet = gguf_vocab._UNICODE_TO_BYTE
    assert sorted(alphabet.values()) == list(range(256))
    assert gguf_vocab.byte_level_bytes("Ġthe") == b" the"
    assert gguf_vocab.byte_level_bytes("Ċ") == b"\n"


def test_bad_files_raise_config_error(tmp_path: Path) -> None:
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"GGML" + bytes(40))
    with pytest.raises(ConfigError, match="magic"):
        gguf_token_bytes(not_gguf)
    with pytest.raises(ConfigError):
        gguf_token_bytes(tmp_path / "missing.gguf")
    wpm = write_vocab(tmp_path / "wpm.gguf", "bert", ["[CLS]"], [CONTROL])
    with pytest.raises(ConfigError, match="not supported"):
        gguf_token_bytes(wpm)


def test_llama_cpp_sees_the_same_bytes(
    tiny_strong: HFModel, tiny_pair_dirs: tuple[Path, Path]
) -> None:
    """The claim this module exists for, checked against llama.cpp itself where it is built."""
    from uplimit.models.llama import LlamaModel
    from uplimit.models.tiny import export_gguf

    path = export_gguf(tiny_pair_dirs[0])
    llama = LlamaModel(path, n_threads=1)
    try:
        assert gguf_token_bytes(path) == [llama.token_bytes(t) for t in range(llama.info.n_vocab)]
        assert llama.vocab_digest() == tiny_strong.vocab_digest()
        assert llama.info.eos_ids == tiny_strong.info.eos_ids
        text = "def f(x):\n    return x  # héllo 🙂<|im_end|>"
        assert llama.tokenize(text, special=True) == tiny_strong.tokenize(text, special=True)
    finally:
        llama.close()
