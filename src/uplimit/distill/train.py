"""LoRA fine-tuning of the weak model on the strong model's answers, on CPU, resumable.

The targets are either the tokens the outer side decoded (hard labels: all it has) or, on the
inner side, the strong model's distributions along its answers (soft targets, `distill.teacher`).
Loss is the cross-entropy over answer positions only. Evaluation is always against the answer
tokens: in bits per token it is what plain arithmetic coding of those answers under the weak
model would cost, and the share of answer tokens whose weak argmax equals the strong token is
the greedy guess's hit rate. Both are reported on a held-out split before and after training.

Batches are fixed by the data and the seed, and a checkpoint (adapters, optimizer, step) is
written atomically every few steps, so an interrupted run resumes where it stopped and ends
with the same adapters as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from uplimit.distill import lora
from uplimit.distill.collect import Answer
from uplimit.distill.data import Example
from uplimit.errors import ConfigError
from uplimit.models.base import LanguageModel
from uplimit.models.chat import Message
from uplimit.progress import Progress

CHECKPOINT = "checkpoint.pt"
LOG_REST_FLOOR = -100.0  # nats: far below any rest bucket a real weak model gives


@dataclass(frozen=True)
class TrainConfig:
    rank: int = 16
    alpha: float = 32.0
    learning_rate: float = 3e-4
    epochs: int = 2
    batch_tokens: int = 4096  # padded tokens per optimizer step
    max_len: int = 768  # prompt + answer; longer examples are cut
    holdout: float = 0.1
    seed: int = 0
    dtype: str = "bfloat16"  # the frozen base weights; adapters train in float32
    checkpoint_every: int = 10
    targets: tuple[str, ...] = lora.TARGETS  # the linear maps that get adapters


@dataclass(frozen=True)
class Evaluation:
    tokens: int
    bits_per_token: float  # cross-entropy of the answer tokens, in bits
    top1: float  # share of answer tokens that are the weak model's argmax
    # The training loss, in bits per token: the cross-entropy against the teacher's
    # distributions where the examples carry them (else the same as bits_per_token).
    loss_bits: float = math.nan


@dataclass(frozen=True)
class TrainResult:
    steps: int
    seconds: float  # this run's training time (a resumed run counts only its own part)
    train_tokens: int  # answer tokens per epoch
    before: Evaluation
    after: Evaluation


def turn_end(model: LanguageModel) -> int:
    """The end-of-sequence id the chat template closes an assistant turn with."""
    chat: list[Message] = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    ids = model.tokenize(model.chat_template.render(chat), special=True)
    ends = [t for t in ids if t in model.info.eos_ids]
    if not ends:
        raise ConfigError(f"{model.info.name}: its chat template ends turns with no EOS token")
    return ends[0]


def examples(model: LanguageModel, answers: Sequence[Answer], max_len: int) -> list[Example]:
    """Token sequences to train on; an answer the model ended gets its end token too."""
    end = turn_end(model)
    out = []
    for a in answers:
        prompt = model.chat_tokens(a.messages)  # type: ignore[arg-type]
        answer = model.tokenize(a.text) + ([end] if a.finish_reason == "stop" else [])
        tokens = (prompt + answer)[:max_len]
        if len(tokens) > len(prompt):
            out.append(Example(tuple(tokens), len(prompt)))
    return out


def split(data: Sequence[Example], holdout: float, seed: int) -> tuple[list, list]:
    """(train, held out), split by prompt so no held-out prompt is trained on."""
    prompts = sorted({e.tokens[: e.n_prompt] for e in data})
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: max(1, round(holdout * len(prompts)))])
    return (
        [e for e in data if e.tokens[: e.n_prompt] not in held],
        [e for e in data if e.tokens[: e.n_prompt] in held],
    )


def batches(data: Sequence[Example], batch_tokens: int, seed: int) -> list[list[Example]]:
    """Length-sorted batches of at most `batch_tokens` padded tokens, in a seeded order."""
    ordered = sorted(data, key=lambda e: (len(e.tokens), e.tokens))
    out: list[list[Example]] = []
    for e in ordered:
        if out and (len(out[-1]) + 1) * len(e.tokens) <= batch_tokens:
            out[-1].append(e)
        else:
            out.append([e])
    random.Random(seed).shuffle(out)
    return out


def _answer_logits(model: nn.Module, batch: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at every position that predicts an answer token, and those tokens."""
    width = max(len(e.tokens) for e in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    predicts = torch.zeros(len(batch), width, dtype=torch.bool)
    for i, e in enumerate(batch):
        ids[i, : len(e.tokens)] = torch.tensor(e.tokens)
        mask[i, : len(e.tokens)] = 1
        predicts[i, e.n_prompt - 1 : len(e.tokens) - 1] = True
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    # The output head only where there is a target: most of the work at 152k logits per row.
    logits = model.get_output_embeddings()(hidden[predicts]).float()
    targets = torch.roll(ids, -1, dims=1)[predicts]
    return logits, targets


def loss_of(logits: torch.Tensor, targets: torch.Tensor, batch: Sequence[Example]) -> torch.Tensor:
    """Mean cross-entropy per answer token: against the teacher's distributions where the
    examples carry them, else against the answer tokens."""
    soft = [e.targets for e in batch]
    if all(t is None for t in soft):
        return F.cross_entropy(logits, targets)
    if any(t is None for t in soft):
        raise ConfigError("a batch mixes examples with and without the teacher's targets")
    ids = torch.from_numpy(np.concatenate([t.ids for t in soft]))
    p = torch.from_numpy(np.exp(np.concatenate([t.logprobs for t in soft])))
    p_rest = torch.from_numpy(np.concatenate([t.rest for t in soft]))
    log_norm = logits.logsumexp(1)
    log_q = logits.gather(1, ids) - log_norm[:, None]
    # The rest bucket's log-probability without cancellation: the mass of the other logits.
    # Where the top k are every token there is no rest: masking with -inf would make NaN
    # gradients there, and the teacher's rounding leaves a p_rest of ~1e-8 that must not
    # meet a log of -1e38, so the masked logits are finite and the log is floored.
    masked = logits.scatter(1, ids, torch.finfo(logits.dtype).min / 2)
    log_q_rest = (masked.logsumexp(1) - log_norm).clamp_min(LOG_REST_FLOOR)
    return (-(p * log_q).sum(1) - p_rest * log_q_rest).mean()


def evaluate(model: nn.Module, data: Sequence[Example], batch_tokens: int) -> Evaluation:
    nats, loss, hits, count = 0.0, 0.0, 0, 0
    with torch.inference_mode():
        for batch in batches(data, batch_tokens, seed=0):
            logits, targets = _answer_logits(model, batch)
            nats += F.cross_entropy(logits, targets, reduction="sum").item()
            loss += loss_of(logits, targets, batch).item() * len(targets)
            hits += int((logits.argmax(-1) == targets).sum())
            count += len(targets)
    per_token = math.log(2) * max(count, 1)
    return Evaluation(count, nats / per_token, hits / max(count, 1), loss / per_token)


def data_digest(data: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in data:
        h.update(json.dumps([e.n_prompt, e.tokens]).encode())
        if e.targets is not None:
            h.update(e.targets.ids.tobytes() + e.targets.logprobs.tobytes())
    return h.hexdigest()


def train(
    model: nn.Module,
    train_set: Sequence[Example],
    held_out: Sequence[Example],
    config: TrainConfig,
    workdir: str | Path,
    *,
    progress: Progress | None = None,
) -> tuple[dict[str, lora.LoRALinear], TrainResult]:
    """Attach adapters to `model` and train them; resumes from `workdir`'s checkpoint."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, config.dtype))
    adapters = lora.attach(
        model, rank=config.rank, alpha=config.alpha, seed=config.seed, targets=config.targets
    )
    params = lora.parameters(adapters)  # float32: made after the base was cast
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    schedule = [
        b
        for epoch in range(config.epochs)
        for b in batches(train_set, config.batch_tokens, config.seed + epoch)
    ]
    identity = {"config": asdict(config), "data": data_digest(train_set)}
    start = _resume(workdir / CHECKPOINT, identity, adapters, optimizer)
    if start == 0:
        before = evaluate(model, held_out, config.batch_tokens)
        _save_json(workdir / "before.json", asdict(before))
    else:  # the base model is gone once adapters have trained: read what it scored
        before = Evaluation(**json.loads((workdir / "before.json").read_text()))

    model.train()
    started, running = time.monotonic(), None
    for step in range(start, len(schedule)):
        lr = config.learning_rate * _warmup_cosine(step, len(schedule))
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits, targets = _answer_logits(model, schedule[step])
        loss = loss_of(logits, targets, schedule[step])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        bits = loss.item() / math.log(2)
        running = bits if running is None else 0.9 * running + 0.1 * bits
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == len(schedule):
            _checkpoint(workdir / CHECKPOINT, identity, adapters, optimizer, step + 1)
        if progress:
            progress(f"{running:.3f} bits/token", step + 1, len(schedule))
    model.eval()
    seconds = time.monotonic() - started
    after = evaluate(model, held_out, config.batch_tokens)
    train_tokens = sum(len(e.tokens) - e.n_prompt for e in train_set)
    return adapters, TrainResult(len(schedule), seconds, train_tokens, before, after)


def _warmup_cosine(step: int, total: int) -> float:
    """Linear warm-up over the first tenth of the steps, then a cosine down to zero."""
    warmup = max(1, total // 10)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _resume(path: Path, identity: dict, adapters: dict, optimizer: torch.optim.Optimizer) -> int:
    if not path.exists():
        return 0
    saved = torch.load(path, weights_only=False)
    if saved["identity"] != identity:
        raise ConfigError(
            f"{path} is from another run (other data or settings): remove it to start over"
        )
    lora.load_state(adapters, saved["adapters"])
    optimizer.load_state_dict(saved["optimizer"])
    return saved["step"]


def _checkpoint(path: Path, identity: dict, adapters: dict, optimizer, step: int) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "identity": identity,
            "adapters": lora.state(adapters),
            "optimizer": optimizer.state_dict(),
            "step": step,
        },
        tmp,
    )
    os.replace(tmp, path)


def _save_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
