"""Strong answers for the training prompts, served through uplimit like any user's request.

The collector is an ordinary OpenAI client of a running outer gateway, so every answer it
gets was arithmetic-coded up the metered link and its upload is charged to the budget; each
record keeps the bits the gateway reports for it. Records are appended one JSON line per
answer and flushed, so an interrupted run loses nothing and a rerun skips what is done. A
request that fails (a timeout on a slow machine, the gateway's error) is logged and left for
the next run; the others go on.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import openai

from uplimit.errors import ConfigError
from uplimit.progress import Progress
from uplimit.prompts import Prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """One served answer: what the outer side decoded, and what its upload cost."""

    id: str
    messages: list[dict]
    temperature: float
    seed: int
    text: str
    finish_reason: str  # "stop": the model ended it; "length": cut at max_tokens
    tokens: int
    uploaded_bits: float  # all-in: its tokens' code plus its share of every frame it was in
    payload_bits: float

    @property
    def key(self) -> tuple[str, float]:
        return self.id, self.temperature


def load_answers(path: str | Path) -> list[Answer]:
    """Read a collection file; a torn last line (a crash mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    answers = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        try:
            answers.append(Answer(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as e:
            if n == len(lines):
                break
            raise ConfigError(f"{path}:{n}: not an answer record ({e})") from e
    return answers


async def collect(
    url: str,
    prompts: Sequence[Prompt],
    temperatures: Sequence[float],
    out: str | Path,
    *,
    model: str = "uplimit",
    api_key: str = "unused",
    max_tokens: int = 256,
    concurrency: int = 16,
    seed: int = 0,
    timeout_s: float = 3600.0,
    progress: Progress | None = None,
) -> list[Answer]:
    """Ask the gateway at `url` every prompt at every temperature; return all answers (those
    whose request failed are missing: run again for them)."""
    out = Path(out)
    done = {a.key: a for a in load_answers(out)}
    # prompt by prompt, every temperature each, so a run stopped early has both kinds of answer
    todo = [(i, p, t) for i, p in enumerate(prompts) for t in temperatures if (p.id, t) not in done]
    total, finished = len(prompts) * len(temperatures), len(done)
    client = openai.AsyncOpenAI(
        base_url=f"{url.rstrip('/')}/v1", api_key=api_key, max_retries=2, timeout=timeout_s
    )
    limit = asyncio.Semaphore(concurrency)
    with out.open("a") as sink:

        async def ask(i: int, prompt: Prompt, temperature: float) -> None:
            nonlocal finished
            messages = [dict(m) for m in prompt.messages]
            async with limit:
                try:
                    r = await client.chat.completions.create(
                        model=model,
                        messages=messages,  # type: ignore[arg-type]
                        temperature=temperature,
                        max_tokens=max_tokens,
                        seed=seed + i,
                    )
                except openai.APIError as e:
                    log.error(
                        "prompt %s at T=%g failed, left for a rerun: %s", prompt.id, temperature, e
                    )
                    return
            extra = (r.model_extra or {})["uplimit"]["choices"][0]
            answer = Answer(
                id=prompt.id,
                messages=messages,
                temperature=temperature,
                seed=seed + i,
                text=r.choices[0].message.content or "",
                finish_reason=r.choices[0].finish_reason,
                tokens=extra["tokens"],
                uploaded_bits=extra["uploaded_bits"],
                payload_bits=extra["payload_bits"],
            )
            sink.write(json.dumps(asdict(answer)) + "\n")
            sink.flush()
            done[answer.key] = answer
            finished += 1
            if progress:
                progress("", finished, total)

        try:
            await asyncio.gather(*(ask(i, p, t) for i, p, t in todo))
        finally:
            await client.close()
    return list(done.values())
