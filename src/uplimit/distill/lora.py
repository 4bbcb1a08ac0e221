"""Low-rank adapters (LoRA) on a transformers model's linear layers, and folding them back in.

    adapters = attach(model, rank=16, alpha=32, seed=0)   # base weights frozen
    ...train the adapters' parameters...
    deltas = weight_deltas(adapters)                      # {"model.layers.0.mlp.up_proj": ΔW}

A layer computes W x + (alpha / rank) B A x; B starts at zero, so an attached model computes
exactly what it did before training. ΔW = (alpha / rank) B A is what a merged model adds to W.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from uplimit.errors import ConfigError

# Every linear map inside the transformer blocks of the Qwen2 / Llama family; the embeddings
# and the output head (tied to them in the small Qwen models) stay as they are.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-`rank` update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.scale = alpha / rank
        # Kaiming-uniform A (as nn.Linear initialises), zero B: the update starts at zero.
        bound = 1 / math.sqrt(base.in_features)
        a = torch.empty(rank, base.in_features).uniform_(-bound, bound, generator=generator)
        self.a = nn.Parameter(a)
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (x @ self.a.to(x.dtype).T) @ self.b.to(x.dtype).T
        return self.base(x) + self.scale * update

    def delta(self) -> torch.Tensor:
        """ΔW, shaped like the base weight [out, in], in float32."""
        return self.scale * (self.b.detach().float() @ self.a.detach().float())


def attach(
    model: nn.Module, *, rank: int, alpha: float, seed: int, targets: tuple[str, ...] = TARGETS
) -> dict[str, LoRALinear]:
    """Freeze `model` and wrap each targeted linear layer; returns the adapters by module name."""
    if rank < 1:
        raise ConfigError(f"LoRA rank must be at least 1, got {rank}")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    adapters: dict[str, LoRALinear] = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                adapter = LoRALinear(child, rank, alpha, generator)
                setattr(module, child_name, adapter)
                adapters[f"{name}.{child_name}" if name else child_name] = adapter
    if not adapters:
        raise ConfigError(f"no linear layers named {targets} in the model")
    return adapters


def parameters(adapters: dict[str, LoRALinear]) -> list[nn.Parameter]:
    return [p for a in adapters.values() for p in (a.a, a.b)]


def state(adapters: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """The adapters' trainable tensors by name, for checkpoints."""
    return {f"{n}.{k}": getattr(a, k).detach().clone() for n, a in adapters.items() for k in "ab"}


def load_state(adapters: dict[str, LoRALinear], saved: dict[str, torch.Tensor]) -> None:
    expected = {f"{n}.{k}" for n in adapters for k in "ab"}
    if set(saved) != expected:
        raise ConfigError("checkpoint does not match these adapters (other model or targets)")
    with torch.no_grad():
        for name, adapter in adapters.items():
            adapter.a.copy_(saved[f"{name}.a"])
            adapter.b.copy_(saved[f"{name}.b"])


def weight_deltas(adapters: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """ΔW per adapted module, float32 [out, in]."""
    return {name: adapter.delta() for name, adapter in adapters.items()}


def quantize_int8_(adapters: dict[str, LoRALinear]) -> int:
    """Round every adapter to what an upload of it would carry, in place, and return its bytes.

    A (rank x in) and B (out x rank) become int8 with one float16 scale per rank component
    (per row of A, per column of B: the long dimension, so the scales cost almost nothing at
    small rank), symmetric, so zero stays exactly zero."""
    size = 0
    with torch.no_grad():
        for adapter in adapters.values():
            for weight, dim in ((adapter.a, 1), (adapter.b, 0)):
                peak = weight.abs().amax(dim, keepdim=True)
                scale = (peak / 127).to(torch.float16).float()
                scale[scale == 0] = 1.0  # an all-zero component stays zero
                weight.copy_(torch.round(weight / scale).clamp(-127, 127) * scale)
                size += weight.numel() + 2 * scale.numel()
    return size


def merge(model: nn.Module, adapters: dict[str, LoRALinear]) -> None:
    """Fold every adapter into its base weight and put the plain linear layer back."""
    with torch.no_grad():
        for name, adapter in adapters.items():
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            base = adapter.base
            base.weight += adapter.delta().to(base.weight.dtype)
            setattr(parent, child_name, base)
