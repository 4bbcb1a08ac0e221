"""Gauge transforms: relabel a model's hidden units so its weights change and its function does not.

A gauge is a signed permutation of each internal axis a model sums over. Every weight that reads
or writes that axis is relabelled the same way, so each dot product sees the same terms, only in
another order (and, for signs, with both factors negated). Supported: Hugging Face Qwen2, Llama
and Mistral causal LMs (pre-RMSNorm, gated MLP, rotary attention, grouped-query attention).

What a gauge moves (`random_gauge` draws each part uniformly):

    axis                    transform                                  exact because
    MLP hidden neurons      permutation; sign on up row + down column  act(gate)*up is linear in up
    KV heads                permutation; query heads follow their KV   attention is per head
    query heads of a group  permutation                                they share one K and V head
    value dims of a head    permutation and signs (V rows, O columns)  softmax weights act per dim
    rotary pairs of a head  sign of pair (i, i + head_dim/2), Q and K  pi rotation commutes w/ RoPE
    residual stream         permutation and signs (residual=True)      RMSNorm commutes with them

Not moved, because it would not be exact: gate rows' signs (SiLU is not odd); the order of
rotary pairs (each pair has its own frequency); a rotation or scaling of the residual stream
(RMSNorm's per-dimension weight does not commute with it unless folded into the next layers).
docs/gauge.md gives the reasons and the architectures this does and does not carry over to.

Exactness contract: the transformed weights hold the same values (gathered, some negated: both
exact in floating point), so applying gauges never drifts, however many are composed. The
forward pass is the same real-number function; in floating point only the summation order inside
matmuls changes (reassociation), so logits differ by rounding noise: max |diff| 9e-5 on the
tiny fp32 model (logits up to 34), 3.3e-4 on Qwen2.5-Coder-1.5B in fp32 (docs/gauge.md).
`uplimit.gauge.verify` checks it.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from transformers import PretrainedConfig, PreTrainedModel

from uplimit.errors import ConfigError
from uplimit.models.hf import HFModel

SUPPORTED = ("qwen2", "llama", "mistral")

IntArray = npt.NDArray[np.int64]
SignArray = npt.NDArray[np.int8]  # entries -1 or +1

# Where each weight's axes live: (space of dim 0, space of dim 1); None leaves the axis alone.
# "norm" is the residual permutation without its signs: an RMSNorm weight scales each residual
# dimension, so it moves with the dimension and keeps its sign (the sign rides on the activation).
_LAYER_AXES: dict[str, tuple[str | None, str | None]] = {
    "input_layernorm.weight": ("norm", None),
    "self_attn.q_proj.weight": ("q", "residual"),
    "self_attn.q_proj.bias": ("q", None),
    "self_attn.k_proj.weight": ("k", "residual"),
    "self_attn.k_proj.bias": ("k", None),
    "self_attn.v_proj.weight": ("v", "residual"),
    "self_attn.v_proj.bias": ("v", None),
    "self_attn.o_proj.weight": ("residual", "o"),
    "self_attn.o_proj.bias": ("residual", None),
    "post_attention_layernorm.weight": ("norm", None),
    "mlp.gate_proj.weight": ("gate", "residual"),
    "mlp.gate_proj.bias": ("gate", None),
    "mlp.up_proj.weight": ("up", "residual"),
    "mlp.up_proj.bias": ("up", None),
    "mlp.down_proj.weight": ("residual", "up"),
    "mlp.down_proj.bias": ("residual", None),
}
_MODEL_AXES: dict[str, tuple[str | None, str | None]] = {
    "model.embed_tokens.weight": (None, "residual"),
    "model.norm.weight": ("norm", None),
    "lm_head.weight": (None, "residual"),  # when tied to the embedding, one tensor, moved once
}


@dataclass(frozen=True)
class Dims:
    """The axis sizes a gauge acts on, read from a model config."""

    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per KV head (HF `repeat_kv`: query head j reads KV head j // group)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def of(cls, config: PretrainedConfig) -> Dims:
        """Raise ConfigError for an architecture whose gauge this module does not know."""
        if config.model_type not in SUPPORTED:
            raise ConfigError(
                f"gauge transforms support {', '.join(SUPPORTED)}, not {config.model_type!r}"
            )
        if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError("partial rotary embeddings are not supported")
        n_heads = config.num_attention_heads
        n_kv = config.num_key_value_heads or n_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        if n_heads % n_kv or head_dim % 2:
            raise ConfigError(f"{n_heads} heads, {n_kv} KV heads, head_dim {head_dim}: unsupported")
        return cls(
            config.num_hidden_layers,
            config.hidden_size,
            config.intermediate_size,
            n_heads,
            n_kv,
            head_dim,
        )


@dataclass(frozen=True)
class Relabel:
    """A signed permutation of one axis: new[i] = sign[i] * old[index[i]]."""

    index: IntArray
    sign: SignArray

    def unsigned(self) -> Relabel:
        return Relabel(self.index, np.ones_like(self.sign))

    def apply(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Relabel `tensor` along `dim`: gather, then negate where sign is -1 (both exact)."""
        moved = tensor.index_select(dim, torch.from_numpy(self.index))  # a new tensor
        if (self.sign < 0).any():
            shape = [1] * tensor.dim()
            shape[dim] = -1
            moved.mul_(torch.from_numpy(self.sign).to(tensor.dtype).view(shape))
        return moved


@dataclass(frozen=True)
class LayerGauge:
    """One decoder layer's draws. Permutations are gather indices (new position -> old)."""

    mlp_perm: IntArray  # [intermediate]
    mlp_sign: SignArray  # [intermediate], on up rows and down columns
    kv_perm: IntArray  # [n_kv_heads]
    q_perm: IntArray  # [n_heads]; q_perm[j] // group == kv_perm[j // group]
    v_perm: IntArray  # [n_kv_heads, head_dim], indexed by the old KV head
    v_sign: SignArray  # [n_kv_heads, head_dim], indexed by the old KV head
    rope_sign: SignArray  # [n_kv_heads, head_dim // 2]: pair (i, i + head_dim/2), old KV head

    def spaces(self, dims: Dims) -> dict[str, Relabel]:
        """The relabelling of each axis inside this layer, derived from the draws."""
        hd = dims.head_dim
        kv_of_q = self.q_perm // dims.group  # old KV head of each new query head
        rope = np.concatenate([self.rope_sign, self.rope_sign], axis=1)  # [n_kv, hd]

        def heads(order: IntArray, within: IntArray, sign: SignArray) -> Relabel:
            # New head h, dim t reads old head order[h], dim within[h, t].
            return Relabel((order[:, None] * hd + within).ravel(), sign.ravel())

        same = np.broadcast_to(np.arange(hd), (dims.n_heads, hd))
        return {
            "q": heads(self.q_perm, same, rope[kv_of_q]),
            "k": heads(self.kv_perm, same[: dims.n_kv_heads], rope[self.kv_perm]),
            "v": heads(self.kv_perm, self.v_perm[self.kv_perm], self.v_sign[self.kv_perm]),
            "o": heads(self.q_perm, self.v_perm[kv_of_q], self.v_sign[kv_of_q]),
            "gate": Relabel(self.mlp_perm, np.ones_like(self.mlp_sign)),
            "up": Relabel(self.mlp_perm, self.mlp_sign),
        }


@dataclass(frozen=True)
class Gauge:
    """A drawn gauge: one `LayerGauge` per layer and, optionally, a residual relabelling."""

    dims: Dims
    layers: tuple[LayerGauge, ...]
    residual: Relabel | None

    @cached_property
    def _spaces(self) -> tuple[dict[str, Relabel], list[dict[str, Relabel]]]:
        """(model-wide spaces, each layer's spaces), derived once per gauge."""
        model: dict[str, Relabel] = {}
        if self.residual is not None:
            model = {"residual": self.residual, "norm": self.residual.unsigned()}
        return model, [{**model, **layer.spaces(self.dims)} for layer in self.layers]

    def relabel(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Hugging Face parameter `name`'s value in this gauge: a new tensor, or `tensor` itself
        if the gauge does not move it. ConfigError for a name with no known axes."""
        layer, axes = _axes(name)
        model, layers = self._spaces
        spaces = model if layer is None else layers[layer]
        for dim, space in enumerate(axes):
            if space in spaces:
                tensor = spaces[space].apply(tensor, dim)
        return tensor

    def digest(self) -> str:
        """sha256 over every index and sign, in a fixed order: names a gauge in an audit."""
        parts: list[np.ndarray] = []
        for layer in self.layers:
            parts += [layer.mlp_perm, layer.mlp_sign, layer.kv_perm, layer.q_perm]
            parts += [layer.v_perm, layer.v_sign, layer.rope_sign]
        if self.residual is not None:
            parts += [self.residual.index, self.residual.sign]
        h = hashlib.sha256()
        for part in parts:
            h.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
        return h.hexdigest()


def random_gauge(
    config: PretrainedConfig | Dims, seed: int, *, residual: bool = True, signs: bool = True
) -> Gauge:
    """Draw a gauge uniformly from the group described in the module docstring.

    `config` is a model's config or its `Dims` (the same dims give the same draws, so a GGUF
    file and its Hugging Face model get the same gauge from one seed).
    `seed` fixes it (numpy PCG64; reproducible with the same numpy). `residual=False` leaves
    the residual stream alone; `signs=False` draws permutations only. Any part may come out as
    the identity (a KV permutation of 2 heads does, half the time): excluding it would make the
    draw less uniform, and the whole gauge is never the identity in practice (p < 1/intermediate!).
    """
    dims = config if isinstance(config, Dims) else Dims.of(config)
    rng = np.random.default_rng(seed)

    def sign(*shape: int) -> SignArray:
        if not signs:
            return np.ones(shape, dtype=np.int8)
        return rng.choice(np.array([-1, 1], dtype=np.int8), size=shape)

    layers = []
    for _ in range(dims.n_layers):
        kv_perm = rng.permutation(dims.n_kv_heads)
        # Query heads move with their KV head, then shuffle inside the group.
        q_perm = np.concatenate([g * dims.group + rng.permutation(dims.group) for g in kv_perm])
        layers.append(
            LayerGauge(
                mlp_perm=rng.permutation(dims.intermediate),
                mlp_sign=sign(dims.intermediate),
                kv_perm=kv_perm,
                q_perm=q_perm,
                v_perm=np.stack([rng.permutation(dims.head_dim) for _ in range(dims.n_kv_heads)]),
                v_sign=sign(dims.n_kv_heads, dims.head_dim),
                rope_sign=sign(dims.n_kv_heads, dims.head_dim // 2),
            )
        )
    stream = Relabel(rng.permutation(dims.hidden), sign(dims.hidden)) if residual else None
    return Gauge(dims, tuple(layers), stream)


def apply_gauge(model: PreTrainedModel, gauge: Gauge) -> None:
    """Relabel `model`'s weights in place (exact: see the module docstring).

    Every parameter must be floating point and one whose axes this module knows; otherwise
    ConfigError is raised before anything changes, so no tensor is left in the old gauge.
    """
    if Dims.of(model.config) != gauge.dims:
        raise ConfigError(f"gauge drawn for {gauge.dims}, model has {Dims.of(model.config)}")
    plan = list(model.named_parameters())  # tied parameters appear once
    for name, param in plan:
        _axes(name)  # every name known, before anything moves
        if not param.is_floating_point():
            raise ConfigError(f"parameter {name!r} is {param.dtype}, not floating point")
    with torch.no_grad():
        for name, param in plan:
            moved = gauge.relabel(name, param)
            if moved is not param:
                param.copy_(moved)


@dataclass(frozen=True)
class Applied:
    """What `gauge_files` did, with timings (seconds)."""

    out: Path
    gauge_digest: str
    load_s: float
    apply_s: float
    save_s: float


def gauge_files(
    model: str | Path,
    out: str | Path,
    seed: int,
    *,
    residual: bool = True,
    signs: bool = True,
    tokenizer_dir: str | Path | None = None,
) -> Applied:
    """Load `model` (HF directory, or GGUF dequantized to fp32), apply `random_gauge(seed)`,
    write it with its tokenizer to the new directory `out` (safetensors).

    Nothing about the gauge is written: a seed next to the weights would undo the defence.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty directory")
    start = time.perf_counter()
    hf = HFModel(model, tokenizer_dir=tokenizer_dir)
    loaded = time.perf_counter()
    gauge = random_gauge(hf.torch_model.config, seed, residual=residual, signs=signs)
    apply_gauge(hf.torch_model, gauge)
    applied = time.perf_counter()
    quantizer = getattr(hf.torch_model, "hf_quantizer", None)
    if quantizer is not None:
        # A GGUF keeps its quantizer attached though transformers dequantized every weight
        # (apply_gauge has checked: all known, all floating point), and save_pretrained
        # refuses a model with a quantizer. Dropping it writes a plain checkpoint.
        quantizer.remove_quantization_config(hf.torch_model)
    hf.torch_model.save_pretrained(out)
    hf.tokenizer.save_pretrained(out)
    saved = time.perf_counter()
    hf.close()
    return Applied(out, gauge.digest(), loaded - start, applied - loaded, saved - applied)


def gauge_bits(dims: Dims, *, residual: bool = True, signs: bool = True) -> float:
    """log2 of the number of gauges `random_gauge` can draw: the information an attacker must
    learn (or upload) to move weights from one gauge to another."""
    per_layer = (
        _log2_factorial(dims.intermediate)
        + _log2_factorial(dims.n_kv_heads)
        + dims.n_kv_heads * _log2_factorial(dims.group)
        + dims.n_kv_heads * _log2_factorial(dims.head_dim)
    )
    if signs:
        per_layer += dims.intermediate + dims.n_kv_heads * (dims.head_dim + dims.head_dim // 2)
    total = dims.n_layers * per_layer
    if residual:
        total += _log2_factorial(dims.hidden) + (dims.hidden if signs else 0)
    return total


def _log2_factorial(n: int) -> float:
    return math.lgamma(n + 1) / math.log(2)


def _axes(name: str) -> tuple[int | None, tuple[str | None, str | None]]:
    """(layer index or None, axes) of a parameter name; ConfigError if unknown."""
    if name in _MODEL_AXES:
        return None, _MODEL_AXES[name]
    parts = name.split(".", 3)  # model.layers.<i>.<rest>
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_AXES:
        return int(parts[2]), _LAYER_AXES[parts[3]]
    raise ConfigError(f"parameter {name!r} has no known gauge axes; refusing to transform")
