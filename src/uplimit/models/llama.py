"""llama.cpp backend (llama-cpp-python's low-level API), the default for GGUF files.

Batch invariance. By default llama.cpp is not batch-invariant: a sequence's logits change
when it shares a `llama_decode` call with others (FACTS.md). One configuration kept every
sequence bit-identical to decoding it alone, and this backend always uses it:
- `use_extra_bufts=False`: no repacked Q4_K/Q8_0 weights, whose kernels switch at >= 4 rows;
- `GGML_CPU_TILED_MM=0` before llama_cpp is imported: no tiled K-quant matmul at >= 8 rows;
- `kv_unified=False`: one KV stream per sequence, so cells never interleave;
- flash attention off: it changes path at >= 64 query rows or >= 512 cached tokens.
Rows of a step are ordered by increasing sequence slot, so that a step stays one ubatch.
`extend` makes one call per chunk length: with per-sequence KV streams llama.cpp cuts a batch
into ubatches of equal tokens per sequence, so mixed lengths would cut a sequence's chunk in
pieces that depend on its neighbours.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from uplimit.errors import BackendError, ConfigError
from uplimit.models import store
from uplimit.models.base import LanguageModel, Logits, ModelInfo, SeqId, Session
from uplimit.models.chat import CHATML, ChatTemplate

if os.environ.setdefault("GGML_CPU_TILED_MM", "0") != "0":
    raise BackendError("GGML_CPU_TILED_MM must be 0 (or unset): batched logits would vary")
# llama.cpp's OpenMP threads spin while they wait. When cores are shared (an inner and an
# outer process on one machine, tests), spinning threads starve the ones doing work: a
# batch-8 step of the weak model took 3.2 s instead of 0.5 s with passive waiting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import llama_cpp

_FLASH_ATTN_DISABLED = 0


@llama_cpp.llama_log_callback
def _quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp logs every load to stderr; errors surface as return codes instead."""


llama_cpp.llama_log_set(_quiet, ctypes.c_void_p(0))
llama_cpp.llama_backend_init()


class LlamaModel(LanguageModel):
    """A GGUF model evaluated by llama.cpp on the CPU."""

    def __init__(self, path: str | Path, *, n_threads: int | None = None) -> None:
        path = Path(path)
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = False
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise BackendError(f"llama.cpp could not load {path}")
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_threads = n_threads or os.cpu_count() or 1
        n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._pieces: list[bytes] | None = None
        eos = frozenset(t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t))
        template = llama_cpp.llama_model_chat_template(model, None)
        self.chat_template = ChatTemplate(template.decode() if template else CHATML)
        self.info = ModelInfo(
            name=path.stem,
            backend="llama.cpp",
            path=str(path),
            n_vocab=n_vocab,
            eos_ids=eos,
            file_sha256=_file_sha256(path),
            build=f"llama-cpp-python {llama_cpp.__version__}; "
            + llama_cpp.llama_print_system_info().decode().strip(),
        )

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        data = text.encode()
        capacity = len(data) + 8  # a token covers at least one byte
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, capacity, False, special)
        if n < 0:
            raise BackendError(f"tokenizer needed {-n} slots, had {capacity}")
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        if self._pieces is None:
            self._pieces = [self._piece(t) for t in range(self.info.n_vocab)]
        return self._pieces[token]

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[:n]

    def session(self, max_sequences: int, max_context: int) -> LlamaSession:
        return LlamaSession(self, max_sequences, max_context)

    def close(self) -> None:
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None


def _file_sha256(path: Path) -> str:
    """The pinned hash for the verified PyPI pair, else the file's hash (seconds per GB)."""
    for spec in store.PAIR:
        try:
            st = store.status(spec)
        except PermissionError:  # the store is another user's (a confined inner): hash the file
            continue
        if st.verified and st.path.resolve() == path.resolve():
            return spec.sha256
    return store.sha256_file(path)


class LlamaSession(Session):
    """Sequences in one llama.cpp context, each in its own KV stream (slot)."""

    def __init__(self, model: LlamaModel, max_sequences: int, max_context: int) -> None:
        if not 1 <= max_sequences <= 256:
            raise ConfigError(f"max_sequences must be in 1..256, got {max_sequences}")
        if max_context < 2:
            raise ConfigError(f"max_context must be >= 2, got {max_context}")
        self._model = model
        self.n_vocab = model.info.n_vocab
        self.max_context = max_context
        self._batch_size = max(max_context, max_sequences)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = max_sequences * max_context  # split evenly across the KV streams
        params.n_batch = params.n_ubatch = self._batch_size
        params.n_seq_max = max_sequences
        params.n_threads = params.n_threads_batch = model.n_threads
        params.flash_attn_type = _FLASH_ATTN_DISABLED
        params.kv_unified = False
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model._model, params)
        if not ctx:
            raise BackendError("llama.cpp could not create a context (out of memory?)")
        self._ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(self._batch_size, 0, 1)
        self._free_slots = list(range(max_sequences))
        self._slot: dict[SeqId, int] = {}
        self._length: dict[SeqId, int] = {}
        self._next_id = 0

    def prefill(self, prompt: Sequence[int]) -> tuple[SeqId, Logits]:
        if not prompt:
            raise ConfigError("a prompt needs at least one token")
        if len(prompt) >= self.max_context:
            raise ConfigError(
                f"prompt of {len(prompt)} tokens leaves no room in a context of {self.max_context}"
            )
        if not self._free_slots:
            raise ConfigError("all sequence slots are in use")
        self._check_tokens(prompt)
        slot = min(self._free_slots)
        self._free_slots.remove(slot)
        seq, self._next_id = self._next_id, self._next_id + 1
        self._slot[seq], self._length[seq] = slot, 0
        try:
            logits = self._decode(
                [(slot, self._length[seq] + i, t) for i, t in enumerate(prompt)], last_only=True
            )
        except BackendError:
            self.drop(seq)
            raise
        self._length[seq] = len(prompt)
        return seq, logits[0]

    def step(self, tokens: Mapping[SeqId, int]) -> dict[SeqId, Logits]:
        if not tokens:
            return {}
        for seq in tokens:
            self._check_seq(seq)
            if self._length[seq] + 1 > self.max_context:
                raise ConfigError(f"sequence {seq} is full ({self.max_context} tokens)")
        self._check_tokens(tokens.values())
        order = sorted(tokens, key=self._slot.__getitem__)  # one ubatch: rows by slot
        rows = [(self._slot[s], self._length[s], tokens[s]) for s in order]
        logits = self._decode(rows, last_only=False)
        for s in order:
            self._length[s] += 1
        return dict(zip(order, logits, strict=True))

    def extend(self, chunks: Mapping[SeqId, Sequence[int]]) -> dict[SeqId, list[Logits]]:
        by_length: dict[int, list[SeqId]] = {}
        for seq, chunk in chunks.items():
            self._check_seq(seq)
            if not chunk:
                raise ConfigError(f"empty chunk for sequence {seq}")
            if self._length[seq] + len(chunk) > self.max_context:
                raise ConfigError(f"sequence {seq} would exceed {self.max_context} tokens")
            self._check_tokens(chunk)
            by_length.setdefault(len(chunk), []).append(seq)
        out: dict[SeqId, list[Logits]] = {}
        for n, seqs in sorted(by_length.items()):
            order = sorted(seqs, key=self._slot.__getitem__)  # one ubatch: rows by slot
            per_call = self._batch_size // n
            for first in range(0, len(order), per_call):
                part = order[first : first + per_call]
                rows = [
                    (self._slot[s], self._length[s] + i, t)
                    for s in part
                    for i, t in enumerate(chunks[s])
                ]
                logits = self._decode(rows, last_only=False)
                for i, s in enumerate(part):
                    out[s] = logits[i * n : (i + 1) * n]
                    self._length[s] += n
        return out

    def truncate(self, seq: SeqId, length: int) -> None:
        self._check_seq(seq)
        if not 1 <= length <= self._length[seq]:
            raise ConfigError(f"cannot truncate sequence {seq} of {self._length[seq]} to {length}")
        if not llama_cpp.llama_memory_seq_rm(self._memory, self._slot[seq], length, -1):
            raise BackendError(f"llama.cpp could not truncate sequence {seq}")
        self._length[seq] = length

    def drop(self, seq: SeqId) -> None:
        self._check_seq(seq)
        slot = self._slot.pop(seq)
        del self._length[seq]
        llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
        self._free_slots.append(slot)

    def length(self, seq: SeqId) -> int:
        self._check_seq(seq)
        return self._length[seq]

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

    def _check_seq(self, seq: SeqId) -> None:
        if seq not in self._slot:
            raise ConfigError(f"unknown sequence {seq}")

    def _check_tokens(self, tokens: Iterable[int]) -> None:
        for t in tokens:
            if not 0 <= t < self.n_vocab:
                raise ConfigError(f"token id {t} outside the vocabulary (0..{self.n_vocab - 1})")

    def _decode(self, rows: list[tuple[int, int, int]], *, last_only: bool) -> list[Logits]:
        """One llama_decode over (slot, position, token) rows; logits of the wanted rows."""
        if not self._ctx:
            raise BackendError("session is closed")
        b = self._batch
        b.n_tokens = len(rows)
        for i, (slot, pos, token) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = token, pos, 1, slot
            b.logits[i] = not last_only or i == len(rows) - 1
        status = llama_cpp.llama_decode(self._ctx, b)
        if status != 0:
            raise BackendError(f"llama_decode returned {status}")
        wanted = [len(rows) - 1] if last_only else range(len(rows))
        out = []
        for i in wanted:
            ptr = llama_cpp.llama_get_logits_ith(self._ctx, i)
            # copy now: the buffer is overwritten by the next decode
            out.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        return out
