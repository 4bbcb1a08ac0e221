"""HFModel's logits in a fresh process are bit-identical to this process's."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import uplimit
from uplimit.models.hf import HFModel


def test_fresh_process_gives_same_logits(
    tiny_strong: HFModel, tiny_pair_dirs: tuple[Path, Path], reference: tuple
) -> None:
    prompt, forced, expected = reference
    script = """
import hashlib, json, sys
import torch
torch.set_num_threads(1)
from uplimit.models.hf import HFModel
model_dir, prompt, forced = json.loads(sys.argv[1])
model = HFModel(model_dir)
with model.session(max_sequences=1, max_context=256) as session:
    seq, logits = session.prefill(prompt)
    digest = hashlib.sha256(logits.tobytes())
    for token in forced:
        digest.update(session.step({seq: token})[seq].tobytes())
print(digest.hexdigest())
"""
    src = str(Path(uplimit.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    argument = json.dumps([str(tiny_pair_dirs[0]), prompt, forced])
    result = subprocess.run(
        [sys.executable, "-c", script, argument],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    assert result.stdout.split()[-1] == hashlib.sha256(b"".join(expected)).hexdigest()
