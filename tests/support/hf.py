"""The tiny strong model's logits along a fixed prompt and continuation (determinism tests;
the `reference` fixture in tests/conftest.py holds this process's trace)."""

from __future__ import annotations

from collections.abc import Sequence

from uplimit.models.hf import HFSession

__all__ = ["CONTINUATION", "PROMPT", "logits_trace"]

PROMPT = "def fibonacci(n):\n"
# Forced continuation: fixed tokens, independent of what the model would pick.
CONTINUATION = '    """Return n numbers."""\n    numbers = [0, 1]\n    return numbers\n'


def logits_trace(session: HFSession, prompt: Sequence[int], forced: Sequence[int]) -> list[bytes]:
    """Raw bytes of the logits after the prompt and after each forced token, one per call."""
    seq, logits = session.prefill(prompt)
    trace = [logits.tobytes()]
    for token in forced:
        trace.append(session.step({seq: token})[seq].tobytes())
    return trace
