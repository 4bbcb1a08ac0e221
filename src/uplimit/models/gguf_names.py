"""Hugging Face Qwen2 parameter names <-> GGUF tensor names (llama.cpp's TENSOR_NAMES).

Only the tensors a Qwen2 checkpoint has. For Qwen2 (NEOX-style rotary embeddings) llama.cpp's
converter stores every weight unchanged, so a GGUF tensor read as numpy (rows, columns) is the
Hugging Face parameter; Llama-architecture files permute their Q/K rows and need more than names.
"""

from __future__ import annotations

from uplimit.errors import ConfigError

__all__ = ["gguf_name", "hf_name"]

_MODEL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_MODEL_BACK = {v: k for k, v in _MODEL.items()}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}


def gguf_name(name: str) -> str:
    """`model.layers.3.mlp.up_proj.weight` -> `blk.3.ffn_up.weight`; ConfigError if unknown."""
    if name in _MODEL:
        return _MODEL[name]
    parts = name.split(".", 3)  # model.layers.<i>.<rest>
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER:
        return f"blk.{parts[2]}.{_LAYER[parts[3]]}"
    raise ConfigError(f"no GGUF name for parameter {name!r}")


def hf_name(name: str) -> str:
    """`blk.3.ffn_up.weight` -> `model.layers.3.mlp.up_proj.weight`; ConfigError if unknown."""
    if name in _MODEL_BACK:
        return _MODEL_BACK[name]
    parts = name.split(".", 2)  # blk.<i>.<rest>
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_BACK:
        return f"model.layers.{parts[1]}.{_LAYER_BACK[parts[2]]}"
    raise ConfigError(f"no Hugging Face name for GGUF tensor {name!r}")
