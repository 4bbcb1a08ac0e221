"""The one table of limits on a stream request, each with its reason.

Both sides read it: the gateway checks a client's request against it (through
`StreamSpec` and `GenerationRequest`, which refuse anything past it with InvalidRequest), and
the inner's downlink parser (`wire.protocol`) and services (`GenerationRequest.from_extra`)
refuse anything past it. One table, so nothing the gateway lets through is refused inside,
where a refusal would end the link for every user.
"""

from __future__ import annotations

__all__ = [
    "MAX_BEST_OF",
    "MAX_EXTRA_BYTES",
    "MAX_PROMPT_TOKENS",
    "MAX_REQUEST_ID_BYTES",
    "MAX_STOPS",
    "MAX_STOP_BYTES",
    "MAX_STREAM_ID",
    "MAX_STREAM_TOKENS",
    "MAX_TOP_K",
]

# Qwen2.5's longest context; also bounds max_tokens of one stream. At most 3 varint bytes a
# token id (ids < 2**21), the longest prompt is 393 kB: one downlink message holds it.
MAX_PROMPT_TOKENS = 131_072
MAX_STREAM_TOKENS = 131_072
MAX_TOP_K = 1 << 32  # larger than any vocabulary: top_k past it means "off" anyway
MAX_STREAM_ID = (1 << 63) - 1  # the outer counts streams from 0; never reached
MAX_STOPS = 4  # OpenAI's limit on stop sequences
MAX_STOP_BYTES = 256  # bounds the matcher's hold-back, so streaming never stalls on it
MAX_BEST_OF = 16  # candidates per stream: each costs the inner a strong-model sequence
MAX_REQUEST_ID_BYTES = 256  # the gateway's ids and withheld-reasoning ids are under 240
# An OPEN_STREAM's service fields as JSON: 4 stop sequences of 256 bytes (up to 6 JSON bytes
# a byte, escaped) and the ids fit in 8 kB; one downlink message holds this and a prompt.
MAX_EXTRA_BYTES = 1 << 16
