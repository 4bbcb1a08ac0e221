"""Hugging Face transformers backend, torch on CPU: for tiny-model tests, weight transforms and
fine-tuning, not for speed (FACTS.md: 2-4x slower than llama.cpp).

    model = HFModel("tiny-strong/")                                   # a model directory
    model = HFModel("qwen-0.5b.gguf", tokenizer_dir="cache/qwen-tok")  # or a GGUF, dequantized

Batch invariance holds by construction: `HFSession.step` evaluates every sequence alone, as a
batch of one against its own KV cache, so which other sequences exist or share the call cannot
reach its arithmetic. The price is one forward pass per sequence per step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from uplimit.errors import BackendError, ConfigError
from uplimit.models.base import LanguageModel, Logits, ModelInfo, SeqId, Session
from uplimit.models.chat import CHATML, ChatTemplate
from uplimit.models.gguf_vocab import byte_level_bytes, gguf_token_bytes

# End-of-turn markers that stop generation when the vocabulary has them, besides the EOS ids
# the model's files declare (Qwen's generation_config lists <|im_end|> and <|endoftext|>).
_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>")
# Pinned so it is part of `ModelInfo.build`: another attention kernel gives other logits.
_ATTENTION = "sdpa"
# Written next to a tokenizer saved from a GGUF, so a cache built from another file is refused.
_SOURCE_FILE = "uplimit-source.sha256"
# Errors that loading foreign files can raise; mapped once, here.
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError)


class HFModel(LanguageModel):
    """A causal LM loaded with transformers: a model directory, or a GGUF file (dequantized).

    `tokenizer_dir`: for a directory model, where the tokenizer lives if not in the directory.
    For a GGUF, building the tokenizer from the file takes ~17 s, so pass a directory: it is
    written on first load and reused afterwards (refused, with ConfigError, if it was built
    from another file).

    `torch_model` and `tokenizer` are public for weight transforms and fine-tuning; `info`
    describes the files as loaded, so save and reload a changed model to get a true identity.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        tokenizer_dir: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        path = Path(path)
        is_gguf = path.is_file() and path.suffix == ".gguf"
        if not (is_gguf or path.is_dir()):
            raise ConfigError(f"{path}: not a model directory or a .gguf file")
        sha256 = _sha256_files([path] if is_gguf else _weight_files(path))
        try:
            if is_gguf:
                self.torch_model = _load_model(path.parent, dtype, gguf_file=path.name)
                self.tokenizer = _gguf_tokenizer(path, sha256, tokenizer_dir)
            else:
                self.torch_model = _load_model(path, dtype)
                self.tokenizer = AutoTokenizer.from_pretrained(
                    tokenizer_dir or path, local_files_only=True
                )
        except _LOAD_ERRORS as e:
            raise BackendError(f"{path}: transformers could not load it ({e})") from e

        n_vocab = self.torch_model.get_output_embeddings().weight.shape[0]  # logits width
        self._pieces = _pad(gguf_token_bytes(path) if is_gguf else self._hf_pieces(), n_vocab)
        self.info = ModelInfo(
            name=path.stem if is_gguf else path.name,
            backend="hf",
            path=str(path.resolve()),
            n_vocab=n_vocab,
            eos_ids=self._eos_ids(n_vocab),
            file_sha256=sha256,
            build=(
                f"torch-{torch.__version__}/transformers-{transformers.__version__}"
                f"/{str(dtype).removeprefix('torch.')}/{_ATTENTION}"
                f"/{torch.backends.cpu.get_cpu_capability()}"
            ),
        )
        template = self.tokenizer.chat_template
        if isinstance(template, dict):  # named templates; "default" is the chat one
            template = template.get("default")
        self.chat_template = ChatTemplate(template or CHATML)

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        return self.tokenizer.encode(
            text, add_special_tokens=False, split_special_tokens=not special
        )

    def token_bytes(self, token: int) -> bytes:
        """Byte-level pieces decoded to raw bytes; added tokens as their text; b"" past the
        tokenizer's end. For a GGUF, llama.cpp's view of the file (see gguf_vocab.py)."""
        if not 0 <= token < self.info.n_vocab:
            raise ConfigError(f"token {token} outside vocabulary of {self.info.n_vocab}")
        return self._pieces[token]

    def session(self, max_sequences: int, max_context: int) -> HFSession:
        return HFSession(self, max_sequences, max_context)

    def _hf_pieces(self) -> list[bytes]:
        backend = self.tokenizer.backend_tokenizer
        if type(backend.decoder).__name__ != "ByteLevel":
            raise ConfigError("HFModel supports byte-level BPE tokenizers only (or GGUF files)")
        vocab = backend.get_vocab(with_added_tokens=False)
        added = self.tokenizer.added_tokens_decoder
        pieces = [b""] * (max([*vocab.values(), *added]) + 1)
        for text, token in vocab.items():
            pieces[token] = byte_level_bytes(text)
        for token, added_token in added.items():
            pieces[token] = added_token.content.encode("utf-8")
        return pieces

    def _eos_ids(self, n_vocab: int) -> frozenset[int]:
        declared = self.torch_model.generation_config.eos_token_id
        ids = set(declared if isinstance(declared, list) else [declared])
        ids.add(self.tokenizer.eos_token_id)
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[marker] for marker in _END_MARKERS if marker in vocab)
        return frozenset(i for i in ids if i is not None and 0 <= i < n_vocab)


class HFSession(Session):
    """Sequences with one DynamicCache each, evaluated one at a time (see module docstring).

    Caller mistakes (unknown id, bad token, a full session or context) raise ConfigError and
    change nothing. If torch fails inside a forward pass, that sequence's cache may be half
    written, so the sequence is dropped and BackendError raised.
    """

    def __init__(self, model: HFModel, max_sequences: int, max_context: int) -> None:
        limit = model.torch_model.config.max_position_embeddings
        if max_sequences < 1 or not 2 <= max_context <= limit:
            raise ConfigError(
                f"need max_sequences >= 1 and 2 <= max_context <= {limit}, "
                f"got {max_sequences} and {max_context}"
            )
        self.max_sequences = max_sequences
        self.max_context = max_context
        self._model = model
        self._caches: dict[SeqId, DynamicCache] = {}
        self._lengths: dict[SeqId, int] = {}
        self._next_id = 0  # ids are never reused, so a stale id cannot reach a new sequence
        self._closed = False

    def prefill(self, prompt: Sequence[int]) -> tuple[SeqId, Logits]:
        self._check_open()
        if not prompt:
            raise ConfigError("prompt is empty")
        if len(prompt) >= self.max_context:
            raise ConfigError(
                f"prompt of {len(prompt)} tokens leaves no room in a context of {self.max_context}"
            )
        for token in prompt:
            self._check_token(token)
        if len(self._caches) >= self.max_sequences:
            raise ConfigError(f"all {self.max_sequences} sequences are in use")
        seq, self._next_id = self._next_id, self._next_id + 1
        self._caches[seq] = DynamicCache(config=self._model.torch_model.config)
        self._lengths[seq] = 0
        return seq, self._forward(seq, prompt)

    def step(self, tokens: Mapping[SeqId, int]) -> dict[SeqId, Logits]:
        self._check_open()
        for seq, token in tokens.items():
            self._check_seq(seq)
            self._check_token(token)
            if self._lengths[seq] >= self.max_context:
                raise ConfigError(f"sequence {seq} is full ({self.max_context} tokens)")
        return {seq: self._forward(seq, [token]) for seq, token in tokens.items()}

    def truncate(self, seq: SeqId, length: int) -> None:
        self._check_open()
        self._check_seq(seq)
        current = self._lengths[seq]
        if not 1 <= length <= current:
            raise ConfigError(f"cannot truncate sequence {seq} of {current} tokens to {length}")
        if length < current:  # crop(0) would mean "to zero" in older transformers
            self._caches[seq].crop(length - current)  # negative: drop that many from the end
            self._lengths[seq] = length

    def drop(self, seq: SeqId) -> None:
        self._check_open()
        self._check_seq(seq)
        del self._caches[seq], self._lengths[seq]

    def length(self, seq: SeqId) -> int:
        self._check_open()
        self._check_seq(seq)
        return self._lengths[seq]

    def close(self) -> None:
        self._caches.clear()
        self._lengths.clear()
        self._closed = True

    def _forward(self, seq: SeqId, tokens: Sequence[int]) -> Logits:
        """Evaluate `tokens` for `seq` alone; the next-token logits after the last one."""
        ids = torch.tensor([list(tokens)], dtype=torch.long)  # [1, T]
        try:
            with torch.inference_mode():
                out = self._model.torch_model(
                    input_ids=ids, cache=self._caches[seq], use_cache=True, logits_to_keep=1
                )
        except RuntimeError as e:
            del self._caches[seq], self._lengths[seq]
            raise BackendError(f"forward pass failed; sequence {seq} dropped ({e})") from e
        self._lengths[seq] += len(tokens)
        return out.logits[0, -1].to(torch.float32).numpy().copy()  # [n_vocab]

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("session is closed")

    def _check_seq(self, seq: SeqId) -> None:
        if seq not in self._caches:
            raise ConfigError(f"unknown sequence {seq}")

    def _check_token(self, token: int) -> None:
        if isinstance(token, bool) or not isinstance(token, int | np.integer):
            raise ConfigError(f"token {token!r} is not an integer")
        if not 0 <= token < self._model.info.n_vocab:
            raise ConfigError(f"token {token} outside vocabulary of {self._model.info.n_vocab}")


def _load_model(directory: Path, dtype: torch.dtype, **kwargs: str) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation=_ATTENTION, local_files_only=True, **kwargs
    )
    # CPU kernels with AVX-512 sum in an order that depends on where a tensor starts in
    # memory, and weights mmapped from safetensors start wherever the file puts them (seen on
    # an AMD EPYC: the same weights from a directory and from a GGUF gave logits 2e-5 apart).
    # Fresh copies are 64-byte aligned, so logits depend on the weights alone.
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone(memory_format=torch.contiguous_format)
    return model.eval()


def _gguf_tokenizer(gguf: Path, sha256: str, cache: str | Path | None) -> PreTrainedTokenizerBase:
    if cache is None:
        return AutoTokenizer.from_pretrained(
            gguf.parent, gguf_file=gguf.name, local_files_only=True
        )
    cache = Path(cache)
    stamp = cache / _SOURCE_FILE
    if stamp.is_file():
        if stamp.read_text().strip() != sha256:
            raise ConfigError(f"tokenizer cache {cache} was built from another GGUF than {gguf}")
        return AutoTokenizer.from_pretrained(cache, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True
    )
    tokenizer.save_pretrained(cache)
    stamp.write_text(sha256 + "\n")  # last: a cache with a stamp is complete
    return tokenizer


def _weight_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))


def _sha256_files(paths: Sequence[Path]) -> str:
    """sha256 of the files' concatenation (of the file itself when there is one); "" if none."""
    if not paths:
        return ""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as file:
            while chunk := file.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _pad(pieces: list[bytes], n_vocab: int) -> list[bytes]:
    """Fit a tokenizer's pieces to the logits width: ids past its end stand for no bytes."""
    return pieces[:n_vocab] + [b""] * (n_vocab - len(pieces))
