"""Real-pair round trips: the strong model's answers, coded against one weak instance and
decoded by another, come back token for token, greedy and sampled."""

from __future__ import annotations

import pytest

from support.marks import slow
from uplimit.bench import BenchSettings, run_bench
from uplimit.coding.calibration import for_pair
from uplimit.coding.sampling import SamplingParams
from uplimit.models.chat import Message
from uplimit.prompts import Prompt

PROMPTS = [
    Prompt("a", (Message(role="user", content="Write a haiku about compilers."),)),
    Prompt("b", (Message(role="user", content="What does `git rebase -i` do?"),)),
    Prompt("c", (Message(role="user", content="Sort a list of dicts by key in Python."),)),
]


@pytest.fixture(scope="module")
def decoder_weak():
    from uplimit.models.loading import load_model

    model = load_model("weak")
    yield model
    model.close()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(0.0),
        SamplingParams(0.7, top_p=0.9),
        pytest.param(
            SamplingParams(1.0, top_k=40), marks=slow("T0.7-top_p covers sampled coding, 13 s")
        ),
    ],
    ids=["greedy", "T0.7-top_p", "T1-top_k"],
)
def test_real_pair_round_trip(real_strong, real_weak, decoder_weak, params):
    calibration = for_pair(real_strong.info.file_sha256, real_weak.info.file_sha256)
    result = run_bench(
        PROMPTS,
        BenchSettings(params, max_tokens=32, frame_tokens=8),
        real_strong,
        real_weak,
        decoder_weak,
        calibration,
    )
    assert result["exact_roundtrip"]
    assert result["mismatches"] == 0
    assert result["tokens"] > 3 * 8  # several frames per stream
    # every frame is accounted for: all-in bits >= the tokens' ideal cost
    assert result["bits_per_token"] >= result["payload_bits_per_token"]
