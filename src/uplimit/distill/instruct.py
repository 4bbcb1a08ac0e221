"""Training prompts the outer side can write for itself: the weak model asks the questions.

No instruction data set exists on this machine beyond HumanEval's 164 prompts, so the weak
model writes questions (self-instruct) from a grid of programming languages and subject
areas. The grid is generic on purpose: a deployment serving developers would write the same
one without looking at its users' prompts. Nothing here reads an evaluation set.
"""

from __future__ import annotations

import itertools
import random

from uplimit.coding.generate import Request, generate
from uplimit.coding.sampling import SamplingParams
from uplimit.models.base import LanguageModel
from uplimit.models.chat import Message
from uplimit.progress import Progress
from uplimit.prompts import Prompt, humaneval, stdlib_questions

LANGUAGES = (
    "Python", "JavaScript", "TypeScript", "Java", "C", "C++", "Rust", "Go", "SQL", "Bash",
    "Ruby", "C#", "Kotlin", "PHP", "Haskell", "R", "Lua", "Scala",
)  # fmt: skip
AREAS = (
    "data structures", "sorting and searching", "string processing", "file input and output",
    "error handling", "concurrency", "unit testing", "performance", "HTTP and networking",
    "databases", "regular expressions", "object-oriented design", "functional programming",
    "memory management", "command-line tools", "debugging", "security", "recursion",
    "dates and times", "parsing text formats", "math and number theory", "type systems",
)  # fmt: skip
_ASKS = (
    "Write one short request that a developer might send to an AI coding assistant, asking "
    "for code in {language} about {area}. Write only the request, in one or two sentences.",
    "Write one question that a student might ask an AI assistant about {area} in {language}. "
    "Write only the question.",
)
_WRITER = SamplingParams(temperature=1.0, top_p=0.95)
_MAX_QUESTION_TOKENS = 80


def self_instruct(
    model: LanguageModel,
    count: int,
    *,
    seed: int = 0,
    batch: int = 16,
    progress: Progress | None = None,
) -> list[Prompt]:
    """`count` distinct questions written by `model` (the weak model), sampled with `seed`."""
    rng = random.Random(seed)
    grid = list(itertools.product(LANGUAGES, AREAS, _ASKS))
    rng.shuffle(grid)
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for start in range(0, len(grid), batch):
        if len(prompts) >= count:
            break
        cells = grid[start : start + batch]
        asks = [
            model.chat_tokens([Message(role="user", content=ask.format(language=lang, area=area))])
            for lang, area, ask in cells
        ]
        requests = [
            Request(tuple(a), _WRITER, seed=rng.getrandbits(64), max_tokens=_MAX_QUESTION_TOKENS)
            for a in asks
        ]
        generations, _ = generate(model, requests)
        for g in generations:
            question = _clean(
                model.detokenize([t for t in g.tokens if t not in model.info.eos_ids])
            )
            if question and question.lower() not in seen and len(prompts) < count:
                seen.add(question.lower())
                message = Message(role="user", content=question)
                prompts.append(Prompt(f"self/{len(prompts):04d}", (message,)))
        if progress:
            progress("", len(prompts), count)
    return prompts


def _clean(text: str) -> str | None:
    """The question in a generation, or None when it is not one (cut off, empty, a list)."""
    text = text.strip().strip('"').strip()
    for prefix in ("Request:", "Question:", "**Request:**", "**Question:**"):
        text = text.removeprefix(prefix).strip()
    if not 20 <= len(text) <= 400 or "\n\n" in text or not text.endswith((".", "?", ")", "`")):
        return None
    return text


def training_prompts(
    model: LanguageModel,
    *,
    self_instructed: int,
    humaneval_count: int,
    stdlib_count: int,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[Prompt]:
    """The distillation corpus: self-instruct, HumanEval and standard-library prompts, shuffled.

    The calibration shipped for the pair was fitted on HumanEval and standard-library prompts
    too; both are training-side sets, and dev.jsonl stays unseen by either.
    """
    rng = random.Random(seed)
    he = humaneval()
    rng.shuffle(he)
    corpus = (
        self_instruct(model, self_instructed, seed=seed, progress=progress)
        + he[:humaneval_count]
        + stdlib_questions(stdlib_count, seed=seed + 1)
    )
    rng.shuffle(corpus)
    return corpus
