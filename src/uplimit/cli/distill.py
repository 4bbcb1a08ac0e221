"""`uplimit distill prompts|collect|train`: teach the weak model the strong one's answers."""

from __future__ import annotations

from pathlib import Path

import typer

from uplimit.cli.common import (
    app,
    console,
    counter_bar,
)

distill_app = typer.Typer(
    help="Distil the strong model into the weak one on the outer side (docs/distill.md).",
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
    import json
    from dataclasses import asdict

    import torch

    from uplimit.distill.collect import load_answers
    from uplimit.distill.export import distilled_dir, export_distilled
    from uplimit.distill.lora import weight_deltas
    from uplimit.distill.train import TrainConfig, examples, split, train
    from uplimit.models.hf import HFModel
    from uplimit.models.loading import resolve
    from uplimit.models.store import uplimit_home

    if threads:
        torch.set_num_threads(threads)
    config = TrainConfig(
        rank=rank,
        alpha=2.0 * rank,
        learning_rate=learning_rate,
        epochs=epochs,
        batch_tokens=batch_tokens,
        max_len=max_len,
    )
    path = resolve(weak)
    cache = tokenizer_dir or uplimit_home() / "tokenizers" / f"{path.stem}-hf"
    with console.status(f"loading {path.name} (dequantized)"):
        model = HFModel(path, tokenizer_dir=cache)
    collected = load_answers(answers)
    train_set, held = split(examples(model, collected, config.max_len), config.holdout, 0)
    console.print(
        f"{len(collected)} answers: {len(train_set)} to train on, {len(held)} held out "
        f"(split by prompt)"
    )
    with counter_bar("training") as update:
        adapters, result = train(
            model.torch_model,
            train_set,
            held,
            config,
            workdir,
            progress=update,
        )
    b, a = result.before, result.after
    console.print(
        f"held out ({a.tokens:,} tokens): {b.bits_per_token:.3f} -> {a.bits_per_token:.3f} "
        f"bits/token, top-1 {b.top1:.1%} -> {a.top1:.1%}; {result.steps} steps, "
        f"{result.train_tokens:,} answer tokens per epoch, {result.seconds / 60:.1f} min"
    )
    report = {
        "train": asdict(config),
        "result": asdict(result),
        "answers": str(answers),
        "collected_tokens": sum(x.tokens for x in collected),
        "collected_upload_bits": sum(x.uploaded_bits for x in collected),
    }
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
