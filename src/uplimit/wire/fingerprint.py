"""The codec fingerprint: everything that must match for the decoder to reproduce the encoder.

Arithmetic decoding is exact only if both sides build bit-identical frequency tables, so both
must run the same weak model file, the same backend build (two llama.cpp builds gave
different logits, FACTS.md), the same codec and calibration, the same frame parameters, and
the same numpy on the same kind of CPU: the Gumbel noise goes through numpy's float64 `log`,
whose SIMD kernels numpy picks at run time from the CPU's features.

On connect the outer sends its fingerprint down (HELLO); the inner compares it with its own
and refuses to serve if anything differs, naming each field with both values in its own log
and sending the differing fields with its values up (a few bytes, charged like all others);
the outer names them in its alarm. An accepting inner sends 4 bytes of its fingerprint's
digest, which the outer checks against its own.
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass

import numpy as np

from uplimit.coding.calibration import Calibration
from uplimit.errors import ConfigError, FingerprintMismatch
from uplimit.models.base import ModelInfo
from uplimit.wire.frame import FrameConfig
from uplimit.wire.protocol import (
    DIGEST_BYTES,
    MAX_FIELDS,
    MAX_REFUSE_VALUE_BYTES,
    Hello,
    encode_downlink,
)

__all__ = [
    "CODEC_VERSION",
    "Difference",
    "FingerprintMismatch",
    "codec_fingerprint",
    "differences",
    "fingerprint_digest",
    "fingerprint_sha256",
    "numpy_simd",
    "refusal_fields",
    "refused_differences",
    "short_value",
    "vocabulary_size",
]

# Bump whenever a change to coding, sampling, noise or the frame grammar changes the bytes
# a frame is coded to (or how they are decoded).
CODEC_VERSION = "4"  # 2: self-delimiting frames, END in the kind symbol; 3: END after RESYNC;
# 4: the hit probability from a logistic model of three features (coding.calibration.HitModel)

# In a refusal, fields that only the inner has are named under this pseudo-key.
INNER_ONLY = "(fields only the inner has)"


def numpy_simd() -> str:
    """The SIMD targets numpy was built with (baseline) and dispatches to on this CPU."""
    try:
        from numpy._core import _multiarray_umath as umath  # numpy 2
    except ImportError:
        from numpy.core import _multiarray_umath as umath  # numpy 1.26

    features = umath.__cpu_features__
    dispatched = [t for t in umath.__cpu_dispatch__ if features.get(t)]
    return f"baseline {','.join(umath.__cpu_baseline__)}; dispatch {','.join(dispatched)}"


def vocabulary_size(fingerprint: dict[str, str]) -> int | None:
    """The vocabulary size a codec fingerprint names (prompt token ids are below it), if any."""
    value = fingerprint.get("frame.n_vocab")
    return None if value is None else int(value)


def codec_fingerprint(
    weak: ModelInfo, calibration: Calibration, config: FrameConfig
) -> dict[str, str]:
    """The fields both sides compare; equal fingerprints mean the same frequency tables."""
    if not weak.file_sha256:
        raise ConfigError(f"weak model {weak.name} has no file hash: it cannot be fingerprinted")
    fields = {
        "codec.version": CODEC_VERSION,
        "weak.sha256": weak.file_sha256,
        "weak.backend": weak.backend,
        "weak.build": weak.build,
        "weak.n_vocab": str(weak.n_vocab),
        "weak.eos_ids": ",".join(map(str, sorted(weak.eos_ids))),
        "calibration.sha256": calibration.digest(),
        "frame.max_tokens_per_stream": str(config.max_tokens_per_stream),
        "frame.n_vocab": str(config.n_vocab),
        **({"frame.withheld_counts": "1"} if config.withheld_counts else {}),
        "numpy.version": np.__version__,
        "numpy.simd": numpy_simd(),
        "cpu.machine": platform.machine(),
    }
    return {k: _one_line(v) for k, v in fields.items()}


def _one_line(value: str) -> str:
    """Build strings may hold newlines or tabs; HELLO values are printable (logs, alarms)."""
    return " ".join("".join(c if c.isprintable() else " " for c in value).split())


def fingerprint_sha256(fingerprint: dict[str, str]) -> bytes:
    """sha256 of the fingerprint's canonical bytes (its HELLO message)."""
    return hashlib.sha256(encode_downlink(Hello.of(fingerprint))).digest()


def fingerprint_digest(fingerprint: dict[str, str]) -> bytes:
    """`fingerprint_sha256` cut to the 4 bytes an accepting inner uploads."""
    return fingerprint_sha256(fingerprint)[:DIGEST_BYTES]


def short_value(value: str) -> str:
    """`value` if it fits a refusal's 255 bytes, else its start and a hash of all of it."""
    if len(value.encode()) <= MAX_REFUSE_VALUE_BYTES:
        return value
    tail = f" ... [sha256 {hashlib.sha256(value.encode()).hexdigest()[:16]}]"
    head = value.encode()[: MAX_REFUSE_VALUE_BYTES - len(tail)].decode(errors="ignore")
    return head + tail


@dataclass(frozen=True)
class Difference:
    key: str
    outer: str | None  # None: the outer did not send this field
    inner: str | None  # None: the inner has no such field

    def describe(self) -> str:
        def show(v: str | None) -> str:
            return "(missing)" if v is None else repr(v)

        return f"{self.key}: outer {show(self.outer)}, inner {show(self.inner)}"


def differences(outer: dict[str, str], inner: dict[str, str]) -> list[Difference]:
    """Every field whose value differs or that one side lacks, by key."""
    return [
        Difference(k, outer.get(k), inner.get(k))
        for k in sorted(outer.keys() | inner.keys())
        if outer.get(k) != inner.get(k)
    ]


def refusal_fields(outer_keys: list[str], diffs: list[Difference]) -> tuple[tuple[int, str], ...]:
    """What the inner sends up for `diffs`: (index into the outer's keys, the inner's value)."""
    index = {k: i for i, k in enumerate(sorted(outer_keys))}
    fields = [
        (index[d.key], short_value(d.inner if d.inner is not None else "(missing)"))
        for d in diffs
        if d.key in index
    ]
    extra = [d.key for d in diffs if d.key not in index]
    if extra:
        fields.append((len(index), short_value(",".join(extra))))
    return tuple(fields)


def refused_differences(outer: dict[str, str], fields: tuple[tuple[int, str], ...]) -> list[str]:
    """The outer's reading of a refusal: one line per differing field, both values."""
    keys = sorted(outer)
    if len(keys) > MAX_FIELDS:
        raise ConfigError(f"a fingerprint has at most {MAX_FIELDS} fields")
    lines = []
    for index, value in fields:
        if index == len(keys):
            lines.append(f"{INNER_ONLY}: {value}")
        else:
            ours = short_value(outer[keys[index]])
            lines.append(f"{keys[index]}: outer {ours!r}, inner {value!r}")
    return lines
