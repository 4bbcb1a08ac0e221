"""Gauge transforms: re-randomise the strong model's weights without changing what it computes.

An attacker who copies weights out piece by piece over a long time holds pieces in different
gauges, which fit together only once matched. docs/gauge.md measures what that is worth (little
against an attacker who can compute: `attack` matches exact gauges perfectly).

- `transform`: draw a gauge from a seed and apply it to a Hugging Face model (Qwen2, Llama,
  Mistral); what is exact and why.
- `verify`: compare two models' logits and greedy tokens on prompts.
- `schedule`: which gauge serves in which epoch (sans-IO), and a JSONL audit of what served when.
- `export`: a gauged serving copy of a GGUF model for llama.cpp (F16/F32); `inner.rotation`
  runs the schedule on the inner side with it.
- `attack`: the matching attacks, to measure the defence.

Submodules are imported explicitly (`from uplimit.gauge.schedule import GaugeSchedule`), so
that the schedule can be used without importing torch.
"""
