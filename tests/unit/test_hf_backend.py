"""HFModel and HFSession on the tiny pair: tokenizer, determinism, errors, the pair itself."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from support.hf import (
    PROMPT,
    logits_trace,
)
from uplimit.errors import ConfigError
from uplimit.models.chat import Message
from uplimit.models.hf import HFModel
from uplimit.models.tiny import build_tiny_pair, export_gguf

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "Naïve café in Zürich — crème brûlée.",
    "日本語のテキスト and русский текст",
    "emoji 🙂🚀 and a tab\there",
    "  leading spaces, trailing newline\n\n",
]
# --- tokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_token_bytes(tiny_strong: HFModel, text: str) -> None:
    ids = tiny_strong.tokenize(text)
    assert tiny_strong.detokenize(ids) == text
    assert b"".join(tiny_strong.token_bytes(t) for t in ids) == text.encode("utf-8")


def test_text_is_normalised_to_nfc(tiny_strong: HFModel) -> None:
    """As Qwen2's tokenizer does: ids round-trip, text only when it is already NFC."""
    assert tiny_strong.detokenize(tiny_strong.tokenize("e\u0301")) == "\u00e9"


def test_token_may_hold_part_of_a_character(tiny_strong: HFModel) -> None:
    pieces = [tiny_strong.token_bytes(t) for t in tiny_strong.tokenize("🚀")]
    assert len(pieces) > 1 and b"".join(pieces) == "🚀".encode()


def test_control_tokens_parse_only_when_asked(tiny_strong: HFModel) -> None:
    im_end = tiny_strong.tokenize("<|im_end|>", special=True)
    assert len(im_end) == 1 and tiny_strong.token_bytes(im_end[0]) == b"<|im_end|>"
    plain = tiny_strong.tokenize("<|im_end|>")
    assert len(plain) > 1 and tiny_strong.detokenize(plain) == "<|im_end|>"


def test_vocab_shape_and_eos(tiny_strong: HFModel) -> None:
    info = tiny_strong.info
    n_tokens = len(tiny_strong.tokenizer)
    assert info.n_vocab == 704 > n_tokens  # logits width rounded up past the tokenizer
    assert all(tiny_strong.token_bytes(t) == b"" for t in range(n_tokens, info.n_vocab))
    assert all(len(tiny_strong.token_bytes(t)) == 1 for t in range(256))  # the byte alphabet
    vocab = tiny_strong.tokenizer.get_vocab()
    assert info.eos_ids == {vocab["<|im_end|>"], vocab["<|endoftext|>"]}
    with pytest.raises(ConfigError):
        tiny_strong.token_bytes(info.n_vocab)


def test_info_identifies_the_files(tiny_strong: HFModel, tiny_pair_dirs: tuple[Path, Path]) -> None:
    weights = (tiny_pair_dirs[0] / "model.safetensors").read_bytes()
    assert tiny_strong.info.file_sha256 == hashlib.sha256(weights).hexdigest()
    assert tiny_strong.info.backend == "hf"
    assert tiny_strong.info.build.startswith("torch-") and "float32" in tiny_strong.info.build


def test_chat_tokens_end_with_assistant_header(tiny_strong: HFModel) -> None:
    ids = tiny_strong.chat_tokens([{"role": "user", "content": "Write hello world."}])
    header = tiny_strong.tokenize("<|im_start|>assistant\n", special=True)
    assert ids[-len(header) :] == header
    assert ids[0] == tiny_strong.tokenize("<|im_start|>", special=True)[0]


# --- determinism -----------------------------------------------------------------------------


def test_logits_are_float32_copies(tiny_strong: HFModel) -> None:
    with tiny_strong.session(max_sequences=1, max_context=64) as session:
        seq, first = session.prefill(tiny_strong.tokenize(PROMPT))
        assert first.dtype == np.float32 and first.shape == (tiny_strong.info.n_vocab,)
        kept = first.copy()
        session.step({seq: 5})
        assert np.array_equal(first, kept)  # not a view into a buffer that the next step reuses


def test_two_sessions_agree_bitwise(tiny_strong: HFModel, reference: tuple) -> None:
    prompt, forced, expected = reference
    with tiny_strong.session(max_sequences=3, max_context=256) as session:
        assert logits_trace(session, prompt, forced) == expected


def test_batch_composition_cannot_change_logits(tiny_strong: HFModel, reference: tuple) -> None:
    """The target shares every step with 1..5 others that join, leave and differ in content."""
    prompt, forced, expected = reference
    other_texts = ["import numpy as np\n", "The weak model", "x = 1", "class A:\n    pass\n", "é"]
    others = [tiny_strong.tokenize(t) for t in other_texts]
    with tiny_strong.session(max_sequences=6, max_context=256) as session:
        active = {session.prefill(others[0])[0]: 0}  # already there when the target starts
        target, logits = session.prefill(prompt)
        trace = [logits.tobytes()]
        for step, token in enumerate(forced):
            if 1 <= step <= 4:  # others 1..4 join, one per step
                active[session.prefill(others[step])[0]] = 0
            if step in (6, 9):  # two leave
                session.drop(next(iter(active)))
                del active[next(iter(active))]
            if step == 11:
                active[session.prefill(others[4])[0]] = 0
            batch = {seq: (7 * step + seq) % 256 for seq in active}  # content differs per seq
            # The target's position in the call alternates between first and last.
            batch = {target: token, **batch} if step % 2 else {**batch, target: token}
            trace.append(session.step(batch)[target].tobytes())
            assert 1 <= len(active) <= 5
    assert trace == expected


def test_truncate_then_restep_reproduces(tiny_strong: HFModel, reference: tuple) -> None:
    prompt, forced, expected = reference
    with tiny_strong.session(max_sequences=1, max_context=256) as session:
        seq, _ = session.prefill(prompt)
        for token in forced[:10]:
            session.step({seq: token})
        keep = len(prompt) + 4
        session.truncate(seq, keep)
        assert session.length(seq) == keep
        again = [session.step({seq: t})[seq].tobytes() for t in forced[4:]]
    assert again == expected[5:]


def test_gguf_file_loads_to_the_same_model(
    tiny_strong: HFModel, tiny_pair_dirs: tuple[Path, Path], reference: tuple, tmp_path: Path
) -> None:
    """The strong model exported as F32 GGUF: same tokenizer view, bit-identical logits."""
    path = export_gguf(tiny_pair_dirs[0])
    cache = tmp_path / "tokenizer"
    for _ in range(2):  # the second load reuses the saved tokenizer
        model = HFModel(path, tokenizer_dir=cache)
        assert (cache / "uplimit-source.sha256").is_file()
        assert model.vocab_digest() == tiny_strong.vocab_digest()
        assert model.info.eos_ids == tiny_strong.info.eos_ids
        assert model.info.file_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert [model.tokenize(t) for t in TEXTS] == [tiny_strong.tokenize(t) for t in TEXTS]
        chat = [Message(role="user", content="Hi")]
        assert model.chat_tokens(chat) == tiny_strong.chat_tokens(chat)
        prompt, forced, expected = reference
        with model.session(max_sequences=1, max_context=256) as session:
            assert logits_trace(session, prompt, forced) == expected


def test_tokenizer_cache_of_another_gguf_is_refused(
    tiny_pair_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    strong, weak = (export_gguf(d) for d in tiny_pair_dirs)
    HFModel(strong, tokenizer_dir=tmp_path / "tokenizer")
    with pytest.raises(ConfigError, match="another GGUF"):
        HFModel(weak, tokenizer_dir=tmp_path / "tokenizer")


# --- session bookkeeping and errors ----------------------------------------------------------


def test_drop_frees_the_slot(tiny_strong: HFModel) -> None:
    prompt = tiny_strong.tokenize(PROMPT)
    with tiny_strong.session(max_sequences=2, max_context=64) as session:
        first, _ = session.prefill(prompt)
        session.prefill(prompt)
        with pytest.raises(ConfigError, match="in use"):
            session.prefill(prompt)
        session.drop(first)
        with pytest.raises(ConfigError, match="unknown"):
            session.length(first)
        again, _ = session.prefill(prompt)
        assert again != first  # ids are not reused
        assert session.length(again) == len(prompt)


def test_bad_input_raises_config_error(tiny_strong: HFModel) -> None:
    n_vocab = tiny_strong.info.n_vocab
    with tiny_strong.session(max_sequences=2, max_context=8) as session:
        for prompt in ([], [n_vocab], [-1], [1.0], [True], list(range(9))):
            with pytest.raises(ConfigError):
                session.prefill(prompt)
        seq, _ = session.prefill([1, 2, 3])
        other, _ = session.prefill([4])
        for tokens in ({seq + 99: 1}, {seq: n_vocab}, {seq: -1}):
            with pytest.raises(ConfigError):
                session.step(tokens)
        # A rejected step changes nothing, not even for its valid sequences.
        with pytest.raises(ConfigError):
            session.step({other: 1, seq: n_vocab})
        assert session.length(other) == 1
        for length in (0, 4):
            with pytest.raises(ConfigError):
                session.truncate(seq, length)
        for _ in range(5):
            session.step({seq: 1})
        with pytest.raises(ConfigError, match="full"):
            session.step({seq: 1})
        for call in (session.drop, session.length):
            with pytest.raises(ConfigError, match="unknown"):
                call(seq + 99)
    with pytest.raises(ConfigError, match="closed"):
        session.prefill([1])


def test_bad_session_or_path_raises_config_error(tiny_strong: HFModel, tmp_path: Path) -> None:
    for max_sequences, max_context in ((0, 8), (1, 0), (1, 10**6)):
        with pytest.raises(ConfigError):
            tiny_strong.session(max_sequences, max_context)
    with pytest.raises(ConfigError):
        HFModel(tmp_path / "missing")


@pytest.mark.parametrize("make", [int, np.int64, np.int32])
def test_numpy_integers_are_tokens(tiny_strong: HFModel, make: type) -> None:
    with tiny_strong.session(max_sequences=1, max_context=8) as session:
        seq, _ = session.prefill([make(1), make(2)])
        session.step({seq: make(3)})
        assert session.length(seq) == 3


# --- the tiny pair ---------------------------------------------------------------------------


def test_pair_shares_a_vocabulary(tiny_strong: HFModel, tiny_weak: HFModel) -> None:
    assert tiny_strong.vocab_digest() == tiny_weak.vocab_digest()
    assert tiny_strong.info.file_sha256 != tiny_weak.info.file_sha256


def test_pair_agrees_on_most_greedy_tokens(tiny_strong: HFModel, tiny_weak: HFModel) -> None:
    """Measured on 10 dev prompts x 100 tokens: 79 % agreement, mean top-1 probability 0.72."""
    agree, top1 = [], []
    for content in ("Write a function that sorts a list.", "Explain what a tuple is."):
        prompt = tiny_strong.chat_tokens([{"role": "user", "content": content}])
        with tiny_strong.session(1, 256) as strong, tiny_weak.session(1, 256) as weak:
            s, s_logits = strong.prefill(prompt)
            w, w_logits = weak.prefill(prompt)
            for _ in range(40):
                token = int(s_logits.argmax())
                probs = np.exp(s_logits - s_logits.max())
                top1.append(probs.max() / probs.sum())
                agree.append(token == int(w_logits.argmax()))
                s_logits = strong.step({s: token})[s]
                w_logits = weak.step({w: token})[w]
    assert 0.4 < np.mean(agree) < 0.97
    assert np.mean(top1) > 0.5


def test_build_is_idempotent_and_reproducible(
    tiny_pair_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    strong_dir, weak_dir = tiny_pair_dirs
    mtime = (strong_dir / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_pair(strong_dir.parent) == (strong_dir, weak_dir)
    assert (strong_dir / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rebuilt
    rebuilt = build_tiny_pair(tmp_path)
    for old, new in zip((strong_dir, weak_dir), rebuilt, strict=True):
        for name in ("model.safetensors", "tokenizer.json"):
            assert (old / name).read_bytes() == (new / name).read_bytes()
