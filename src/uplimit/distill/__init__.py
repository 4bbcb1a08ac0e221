"""Distillation on the outer side: teach the weak model to imitate the strong one.

    prompts  (instruct.py: self-instruct by the weak model, HumanEval, standard library)
      -> collect (collect.py: served through uplimit like any request; the upload is counted)
      -> train   (train.py + lora.py: LoRA of the weak model on CPU, resumable)
      -> export  (export.py: the merged weak model as a GGUF that llama.cpp serves)

docs/distill.md has the measurements.
"""
