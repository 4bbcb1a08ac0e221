"""`uplimit distill prompts|collect|train|teach`: teach the weak model the strong one's answers."""

from __future__ import annotations

from pathlib import Path

import typer

from uplimit.cli.common import app, console, counter_bar, progress_bar

distill_app = typer.Typer(
    help="Distil the strong model into the weak one (docs/distill.md).",
    no_args_is_help=True,
)
app.add_typer(distill_app, name="distill", rich_help_panel="Models")


@distill_app.command("prompts")
def distill_prompts(
    out: Path = typer.Option(..., help="Prompt file (JSONL) to write."),
    self_instruct: int = typer.Option(160, help="Questions the weak model writes."),
    humaneval: int = typer.Option(40, help="HumanEval prompts."),
    stdlib: int = typer.Option(40, help="Standard-library questions."),
    weak: str = typer.Option("weak", help="The weak model that writes questions."),
    seed: int = typer.Option(0, help="Sampling and shuffling seed."),
) -> None:
    """Build the training prompts (never from an evaluation set)."""
    from uplimit.distill.instruct import training_prompts
    from uplimit.models.loading import load_model
    from uplimit.prompts import write_jsonl

    model = load_model(weak)
    with counter_bar("self-instruct") as update:
        prompts = training_prompts(
            model,
            self_instructed=self_instruct,
            humaneval_count=humaneval,
            stdlib_count=stdlib,
            seed=seed,
            progress=update,
        )
    write_jsonl(prompts, out)
    console.print(f"wrote {len(prompts)} prompts to {out}")


@distill_app.command("collect")
def distill_collect(
    prompts: Path = typer.Option(..., help="Prompt file (JSONL)."),
    out: Path = typer.Option(..., help="Answers file (JSONL), appended; a rerun resumes."),
    url: str = typer.Option("http://127.0.0.1:8000", help="The outer gateway."),
    model: str = typer.Option("uplimit", help="Model name the gateway serves."),
    api_key: str = typer.Option("unused", help="The gateway's API key, if it has one."),
    temperature: list[float] = typer.Option([0.0], help="Repeat for several."),
    max_tokens: int = typer.Option(256),
    concurrency: int = typer.Option(16, help="Requests in flight."),
    seed: int = typer.Option(0, help="Request i uses seed SEED + i."),
    timeout: float = typer.Option(3600.0, help="Seconds one request may take."),
) -> None:
    """Serve the prompts through uplimit and keep the answers; the upload is charged."""
    import asyncio

    from uplimit.distill.collect import collect
    from uplimit.prompts import load_jsonl

    with counter_bar("answers") as update:
        answers = asyncio.run(
            collect(
                url,
                load_jsonl(prompts),
                temperature,
                out,
                model=model,
                api_key=api_key,
                max_tokens=max_tokens,
                concurrency=concurrency,
                seed=seed,
                timeout_s=timeout,
                progress=update,
            )
        )
    tokens = sum(a.tokens for a in answers)
    bits = sum(a.uploaded_bits for a in answers)
    console.print(
        f"{len(answers)} answers, {tokens:,} tokens, {bits / 8:,.0f} bytes uploaded "
        f"({bits / max(tokens, 1):.3f} bits/token) in {out}"
    )


@distill_app.command("train")
def distill_train(
    answers: Path = typer.Option(..., help="Answers file from `uplimit distill collect`."),
    workdir: Path = typer.Option(..., help="Checkpoints and results; a rerun resumes."),
    weak: str = typer.Option("weak", help="The weak model: the pair's, or a GGUF file."),
    tokenizer_dir: Path | None = typer.Option(None, help="Tokenizer cache (default: beside it)."),
    rank: int = typer.Option(16),
    epochs: int = typer.Option(2),
    learning_rate: float = typer.Option(3e-4),
    batch_tokens: int = typer.Option(4096, help="Padded tokens per optimizer step."),
    max_len: int = typer.Option(768, help="Prompt + answer tokens; longer ones are cut."),
    threads: int = typer.Option(0, help="torch threads; 0: all cores."),
    export: bool = typer.Option(True, help="Write the merged GGUF when done."),
) -> None:
    """LoRA-train the weak model on the answers (CPU, bf16), then export the merged GGUF."""
    from uplimit.distill.collect import load_answers
    from uplimit.distill.train import examples, split

    config = _config(rank, epochs, learning_rate, batch_tokens, max_len=max_len)
    path, model = _load_trainable(weak, tokenizer_dir, threads)
    collected = load_answers(answers)
    train_set, held = split(examples(model, collected, config.max_len), config.holdout, 0)
    console.print(
        f"{len(collected)} answers: {len(train_set)} to train on, {len(held)} held out "
        f"(split by prompt)"
    )
    adapters, report = _train(model, train_set, held, config, workdir)
    report |= {
        "answers": str(answers),
        "collected_tokens": sum(x.tokens for x in collected),
        "collected_upload_bits": sum(x.uploaded_bits for x in collected),
    }
    _finish(path, model, adapters, report, workdir, export)


@distill_app.command("teach")
def distill_teach(
    workdir: Path = typer.Option(..., help="The teacher's data, checkpoints and results."),
    count: int = typer.Option(64, help="Training prompts (HumanEval + standard library)."),
    temperatures: str = typer.Option("0,1.0", help="The strong model answers at each."),
    max_tokens: int = typer.Option(256, help="Tokens per answer."),
    top_k: int = typer.Option(32, help="Teacher tokens kept per position; the rest is one."),
    seed: int = typer.Option(2, help="Prompt-selection and sampling seed."),
    strong: str = typer.Option("strong", help="The strong model: the pair's, or a GGUF file."),
    weak: str = typer.Option("weak", help="The weak model: the pair's, or a GGUF file."),
    tokenizer_dir: Path | None = typer.Option(None, help="Tokenizer cache (default: beside it)."),
    rank: int = typer.Option(1, help="Small: the adapter goes up the metered link."),
    targets: str = typer.Option("down_proj", help="Comma-separated linear maps to adapt."),
    epochs: int = typer.Option(1),
    learning_rate: float = typer.Option(1e-3),
    batch_tokens: int = typer.Option(4096, help="Padded tokens per optimizer step."),
    hard: bool = typer.Option(
        False, help="Train on the answers' tokens instead of the teacher's distributions."
    ),
    threads: int = typer.Option(0, help="torch threads; 0: all cores."),
    export: bool = typer.Option(True, help="Write the merged GGUF when done."),
) -> None:
    """Inner side: distil the strong model's full distributions into a small adapter.

    The adapter is what would go up the metered link: it is rounded to int8 before it is
    evaluated, and its bytes and share of the lifetime budget are reported."""
    import dataclasses
    import json

    from uplimit.distill import lora
    from uplimit.distill.data import load_taught, save_taught
    from uplimit.distill.teacher import teach
    from uplimit.distill.train import evaluate, split
    from uplimit.link.budget import Budgets
    from uplimit.models.loading import load_model
    from uplimit.models.pins import STRONG
    from uplimit.prompts import training_set

    temps = [float(t) for t in temperatures.split(",")]
    workdir.mkdir(parents=True, exist_ok=True)
    data, meta = workdir / "taught.npz", workdir / "taught.json"
    with console.status("loading the strong model"):
        teacher = load_model(strong)
    identity = {  # the teacher by its hash: another file at the same path is another teacher
        "count": count, "temperatures": temps, "max_tokens": max_tokens, "top_k": top_k,
        "seed": seed, "strong_sha256": teacher.info.file_sha256,
    }  # fmt: skip
    if data.exists() and meta.exists() and json.loads(meta.read_text()) == identity:
        taught = load_taught(data)
        console.print(f"read the teacher's data from {data}")
    else:
        with progress_bar() as update:
            taught = teach(
                teacher,
                training_set(count, seed),
                temperatures=temps,
                max_tokens=max_tokens,
                k=top_k,
                seed=seed,
                progress=update,
            )
        save_taught(data, taught)
        meta.write_text(json.dumps(identity) + "\n")
    teacher.close()
    if hard:
        taught = [dataclasses.replace(e, targets=None) for e in taught]
    config = _config(
        rank,
        epochs,
        learning_rate,
        batch_tokens,
        max_len=max(len(e.tokens) for e in taught),
        targets=tuple(targets.split(",")),
    )
    path, model = _load_trainable(weak, tokenizer_dir, threads)
    train_set, held = split(taught, config.holdout, 0)
    console.print(
        f"{len(taught)} answers ({sum(len(e.tokens) - e.n_prompt for e in taught):,} tokens): "
        f"{len(train_set)} to train on, {len(held)} held out (split by prompt); "
        f"{'hard labels' if hard else f'the top {top_k} of the teacher'}"
    )
    run = workdir / ("hard" if hard else "soft")
    adapters, report = _train(model, train_set, held, config, run)
    upload = lora.quantize_int8_(adapters)
    rounded = evaluate(model.torch_model, held, config.batch_tokens)
    saved = report["result"]["before"]["bits_per_token"] - rounded.bits_per_token
    budget = Budgets.default_for(STRONG.size).lifetime_bytes if strong == "strong" else None
    report |= {
        "teacher": identity,
        "hard": hard,
        "upload_bytes": upload,
        "rounded": dataclasses.asdict(rounded),
        "lifetime_budget_bytes": budget,
        "payback_tokens": 8 * upload / saved if saved > 0 else None,
    }
    share = f", {upload / budget:.2%} of the lifetime budget" if budget else ""
    payback = (
        f"pays for itself after {8 * upload / saved:,.0f} tokens"
        if saved > 0
        else "never pays for itself"
    )
    console.print(
        f"adapter in int8: {upload:,} bytes{share}; held out {rounded.bits_per_token:.3f} "
        f"bits/token, top-1 {rounded.top1:.1%} ({saved:+.3f} bits/token saved: {payback})"
    )
    _finish(path, model, adapters, report, run, export)


def _config(rank: int, epochs: int, learning_rate: float, batch_tokens: int, **more):
    """The training settings from the command line. Alpha is twice the rank, so the update's
    scale (alpha / rank) is the same at every rank."""
    from uplimit.distill.train import TrainConfig

    return TrainConfig(
        rank=rank,
        alpha=2.0 * rank,
        learning_rate=learning_rate,
        epochs=epochs,
        batch_tokens=batch_tokens,
        **more,
    )


def _load_trainable(weak: str, tokenizer_dir: Path | None, threads: int):
    """The weak GGUF's path, and the model loaded through transformers (dequantized)."""
    import torch

    from uplimit.models.hf import HFModel
    from uplimit.models.loading import resolve
    from uplimit.models.store import uplimit_home

    if threads:
        torch.set_num_threads(threads)
    path = resolve(weak)
    cache = tokenizer_dir or uplimit_home() / "tokenizers" / f"{path.stem}-hf"
    with console.status(f"loading {path.name} (dequantized)"):
        return path, HFModel(path, tokenizer_dir=cache)


def _train(model, train_set, held, config, workdir: Path) -> tuple[dict, dict]:
    """Train (resuming from `workdir`), print the held-out result; adapters and a report."""
    from dataclasses import asdict

    from uplimit.distill.train import train

    with counter_bar("training") as update:
        adapters, result = train(
            model.torch_model, train_set, held, config, workdir, progress=update
        )
    b, a = result.before, result.after
    console.print(
        f"held out ({a.tokens:,} tokens): {b.bits_per_token:.3f} -> {a.bits_per_token:.3f} "
        f"bits/token, top-1 {b.top1:.1%} -> {a.top1:.1%}; {result.steps} steps, "
        f"{result.train_tokens:,} answer tokens per epoch, {result.seconds / 60:.1f} min"
    )
    return adapters, {"train": asdict(config), "result": asdict(result)}


def _finish(path: Path, model, adapters: dict, report: dict, workdir: Path, export: bool) -> None:
    """Write the report, and the merged GGUF if asked."""
    import json

    from uplimit.distill.export import distilled_dir, export_distilled
    from uplimit.distill.lora import weight_deltas

    (workdir / "result.json").write_text(json.dumps(report, indent=2) + "\n")
    if export:
        with console.status("writing the merged GGUF"):
            done = export_distilled(
                path,
                model.info.file_sha256,
                weight_deltas(adapters),
                distilled_dir(),
                manifest=report,
            )
        console.print(f"wrote {done.path} (sha256 {done.sha256})")
