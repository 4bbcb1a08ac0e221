"""`uplimit load`: a running deployment under N concurrent clients, measured at its API.

Each of N clients sends streamed chat requests one after another, so N streams are in flight
at once. Times are what a user sees: to the first chunk with text (from sending the request),
and between chunks with text. Bits come from two places:

- each answer's own figures (its `uplimit` object): the tokens' own code (payload bits) and
  the frame bits the outer attributes to it;
- the budget's lifetime usage on `/status.json` before and after the run (the ledger when the
  outer can read it, else its receive counter): everything the link charged meanwhile, i.e.
  frames, ENDs and the timing charge, divided over the run's tokens. Traffic from anyone else
  during the run counts too: measure on a deployment of your own.

The all-in figure divided by the payload figure is what framing and cadence cost at that load.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from uplimit.errors import UplimitError
from uplimit.prompts import Prompt

__all__ = ["Answer", "LoadResult", "LoadSettings", "run_load"]

STATUS_POLL_S = 0.25


@dataclass(frozen=True)
class LoadSettings:
    url: str  # the outer's base URL, e.g. http://127.0.0.1:8000
    clients: int
    requests_per_client: int = 4
    max_tokens: int = 64
    temperature: float = 0.0
    model: str = "uplimit"
    api_key: str | None = None
    admin_key: str | None = None  # for /status.json when the outer has one
    timeout_s: float = 600.0
    settle_s: float = 30.0  # how long to wait for a fresh budget sample


@dataclass(frozen=True)
class Answer:
    prompt_id: str
    seconds: float
    ttft_s: float | None  # None: no text came (an error, or an empty answer)
    gaps_s: tuple[float, ...]  # between consecutive chunks with text
    tokens: int
    bits: float  # the frame bits the outer attributes to this answer
    payload_bits: float  # the tokens' own code
    error: str | None = None


@dataclass(frozen=True)
class LoadResult:
    settings: LoadSettings
    answers: tuple[Answer, ...]
    seconds: float
    charged_bytes: int | None  # the budget's usage during the run; None: not readable
    charged_source: str | None  # "ledger" or "receive counter"

    def summary(self) -> dict[str, Any]:
        """The figures of one load level, JSON-ready."""
        ok = [a for a in self.answers if a.error is None]
        tokens = sum(a.tokens for a in ok)
        payload = sum(a.payload_bits for a in ok)
        frames = sum(a.bits for a in ok)
        all_in = 8 * self.charged_bytes / tokens if self.charged_bytes and tokens else None
        ttft = [a.ttft_s for a in ok if a.ttft_s is not None]
        gaps = [g for a in ok for g in a.gaps_s]
        return {
            "clients": self.settings.clients,
            "answers": len(ok),
            "errors": len(self.answers) - len(ok),
            "tokens": tokens,
            "seconds": self.seconds,
            "tokens_per_s": tokens / self.seconds if self.seconds > 0 else None,
            "payload_bits_per_token": payload / tokens if tokens else None,
            "frame_bits_per_token": frames / tokens if tokens else None,
            "charged_bytes": self.charged_bytes,
            "charged_source": self.charged_source,
            "all_in_bits_per_token": all_in,
            "all_in_over_payload": all_in / (payload / tokens) if all_in and payload else None,
            "ttft_s": _percentiles(ttft),
            "between_chunks_s": _percentiles(gaps),
        }


def _percentiles(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    p50, p95 = np.percentile(values, [50, 95])
    return {"p50": float(p50), "p95": float(p95), "max": float(max(values))}


async def run_load(
    settings: LoadSettings,
    prompts: Sequence[Prompt],
    *,
    on_answer: Callable[[Answer], None] | None = None,
) -> LoadResult:
    """Run one load level; client c's r-th request asks prompt (c * R + r) mod len(prompts)."""
    if not prompts:
        raise UplimitError("load: no prompts")
    if settings.clients < 1 or settings.requests_per_client < 1:
        raise UplimitError("load: clients and requests per client must be at least 1")
    headers = {"authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    limits = httpx.Limits(max_connections=settings.clients + 2)
    timeout = httpx.Timeout(settings.timeout_s, connect=30.0)
    async with httpx.AsyncClient(
        base_url=settings.url.rstrip("/"), headers=headers, limits=limits, timeout=timeout
    ) as http:
        before = await _fresh_budget(http, settings)
        started = time.monotonic()

        async def client(c: int) -> list[Answer]:
            answers = []
            for r in range(settings.requests_per_client):
                prompt = prompts[(c * settings.requests_per_client + r) % len(prompts)]
                answer = await _ask(http, settings, prompt)
                if on_answer is not None:
                    on_answer(answer)
                answers.append(answer)
            return answers

        per_client = await asyncio.gather(*(client(c) for c in range(settings.clients)))
        seconds = time.monotonic() - started
        after = await _fresh_budget(http, settings) if before is not None else None
    charged = source = None
    if before is not None and after is not None:
        charged, source = after.used_bytes - before.used_bytes, after.source
    answers = tuple(a for batch in per_client for a in batch)
    return LoadResult(settings, answers, seconds, charged, source)


async def _ask(http: httpx.AsyncClient, settings: LoadSettings, prompt: Prompt) -> Answer:
    body = {
        "model": settings.model,
        "messages": [dict(m) for m in prompt.messages],
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "stream": True,
    }
    sent = time.monotonic()
    chunk_times: list[float] = []
    extra: dict[str, Any] | None = None
    error: str | None = None
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                error = f"HTTP {r.status_code}: {_error_message(r.text)}"
            else:
                async for event in _sse_events(r):
                    if "error" in event:
                        error = f"stream error: {_error_message(json.dumps(event))}"
                        break
                    for choice in event.get("choices", ()):
                        if choice.get("delta", {}).get("content"):
                            chunk_times.append(time.monotonic())
                    if "uplimit" in event and event.get("choices"):
                        extra = event["uplimit"]
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    seconds = time.monotonic() - sent
    if error is None and extra is None:
        error = "the stream ended without its closing chunk"
    return Answer(
        prompt_id=prompt.id,
        seconds=seconds,
        ttft_s=chunk_times[0] - sent if chunk_times else None,
        gaps_s=tuple(float(d) for d in np.diff(chunk_times)),
        tokens=int(extra["tokens"]) if extra else 0,
        bits=float(extra["uploaded_bits"]) if extra else 0.0,
        payload_bits=float(extra["payload_bits"]) if extra else 0.0,
        error=error,
    )


async def _sse_events(r: httpx.Response):
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return
        yield json.loads(data)


def _error_message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:200]


@dataclass(frozen=True)
class _Budget:
    now: float  # the page's clock when it answered
    sampled_at: float  # when its newest meter sample was taken (the page's clock)
    used_bytes: int
    source: str


async def _budget(http: httpx.AsyncClient, settings: LoadSettings) -> _Budget | None:
    """The budget's newest sample on /status.json; None if the page cannot be read."""
    headers = {"authorization": f"Bearer {settings.admin_key}"} if settings.admin_key else None
    try:
        r = await http.get("/status.json", headers=headers)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    status = r.json()
    budget, burndown = status["budget"], status["burndown"]
    if budget["used_bytes"] is None or not burndown:
        return None
    return _Budget(status["at"], burndown[-1]["at"], int(budget["used_bytes"]), budget["source"])


async def _fresh_budget(http: httpx.AsyncClient, settings: LoadSettings) -> _Budget | None:
    """The first budget sample taken after this call: the page samples on a timer, and its own
    clock says when (so the two hosts' clocks need not agree)."""
    first = await _budget(http, settings)
    if first is None:
        return None
    deadline = time.monotonic() + settings.settle_s
    while time.monotonic() < deadline:
        sample = await _budget(http, settings)
        if sample is not None and sample.sampled_at > first.now:
            return sample
        await asyncio.sleep(STATUS_POLL_S)
    return None
