"""`uplimit`'s boundary: uplimit's errors and foreign ones a command meets end it with one line
and exit status 2; a bug keeps its traceback."""

import sys

import pytest

from uplimit import cli


def _run(monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", ["uplimit", *argv])
    cli.main()


def test_a_file_the_command_cannot_read_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    missing = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as e:
        _run(monkeypatch, "plan", "--weights-bytes", "1e9", "--tokens-per-day", "1e6",
             "--bench", str(missing))  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(missing) in err and "Traceback" not in err


def test_uplimit_errors_exit_2_and_bugs_propagate(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        _run(monkeypatch, "plan", "--tokens-per-day", "1e6", "--bits-per-token", "0.1")
    assert e.value.code == 2 and "--weights-bytes" in capsys.readouterr().err

    def bug() -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "app", bug)
    with pytest.raises(KeyError):
        cli.main()
