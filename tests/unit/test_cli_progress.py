"""Progress where no terminal shows a bar: plain lines, throttled, one phase at a time."""

from uplimit.cli.common import LineProgress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lines_of(name: str | None = None) -> tuple[LineProgress, list[str], Clock]:
    lines: list[str] = []
    clock = Clock()
    return LineProgress(lines.append, name, every_s=30.0, clock=clock), lines, clock


def test_a_phase_is_shown_when_it_starts_every_interval_and_once_when_it_finishes() -> None:
    progress, lines, clock = lines_of()
    progress("generating", 0, 200)
    for done in range(1, 200):
        clock.now += 1.0
        progress("generating", done, 200)
    progress("generating", 200, 200)
    progress("generating", 200, 200)
    assert lines[0] == "generating: 0 of 200 (0 %)"
    assert lines[-1] == "generating: 200 of 200 (100 %)"
    # 199 s of steady work: a line at 30, 60, ..., 180 s, none in between
    assert lines[1:-1] == [
        f"generating: {t:,} of 200 ({100 * t / 200:.0f} %)" for t in range(30, 200, 30)
    ]


def test_interleaved_phases_are_throttled_each_on_its_own() -> None:
    progress, lines, clock = lines_of()
    for step in range(10):
        clock.now = float(step)
        progress("encoding", step, 100)
        progress("decoding", step, 100)
    assert lines == ["encoding: 0 of 100 (0 %)", "decoding: 0 of 100 (0 %)"]


def test_a_finished_phase_that_starts_over_is_shown_again() -> None:
    progress, lines, _ = lines_of()
    progress("epoch", 5, 5)
    progress("epoch", 0, 5)
    assert lines == ["epoch: 5 of 5 (100 %)", "epoch: 0 of 5 (0 %)"]


def test_an_unknown_total_shows_the_count_alone() -> None:
    progress, lines, clock = lines_of()
    progress("prompts", 3, 0)
    clock.now = 31.0
    progress("prompts", 9, 0)
    assert lines == ["prompts: 3", "prompts: 9"]


def test_a_named_counter_carries_the_callbacks_what_as_a_note() -> None:
    progress, lines, clock = lines_of("training")
    progress("loss 2.31", 1, 40)
    clock.now = 5.0
    progress("loss 2.10", 2, 40)  # the note changed, the phase did not: throttled
    clock.now = 40.0
    progress("loss 1.75 [held out]", 20, 40)
    progress("loss 1.70", 40, 40)
    assert lines == [
        "training: 1 of 40 (2 %), loss 2.31",
        "training: 20 of 40 (50 %), loss 1.75 [held out]",
        "training: 40 of 40 (100 %), loss 1.70",
    ]
