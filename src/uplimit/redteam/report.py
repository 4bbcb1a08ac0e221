"""The red-team report: one row per attack, one per detector on honest traffic; Markdown + JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from uplimit.redteam.live import Outcome

__all__ = ["AttackRow", "DetectorRow", "Report", "alarm_lines", "short"]

MAX_ALARM_CHARS = 200  # a refusal's alarm quotes every field: keep the table readable


def short(text: str) -> str:
    return text if len(text) <= MAX_ALARM_CHARS else text[: MAX_ALARM_CHARS - 3] + "..."


def alarm_lines(out: Outcome) -> list[tuple[float, str]]:
    """Every alarm of a run, in time order: the link's, the monitor's, the spot-checker's."""
    lines = [(a.at, f"link {a.kind}: {a.message}") for a in out.link_alarms]
    lines += [(a.at, f"bits/token: {a.describe()}") for a in out.monitor_alarms]
    lines += [(v.at, f"spot-check: {v.describe()}") for v in out.verdicts if not v.agree]
    return [(at, short(text)) for at, text in sorted(lines)]


@dataclass
class AttackRow:
    attack: str
    channel: str  # the channel number and name
    temperature: float | None
    secret_bytes: int  # what the attacker wanted out
    moved_bytes: float  # secret bytes that reached the outer side (`where`)
    moved_before_alarm_bytes: float | None  # of which before the first alarm (token attacks)
    where: str
    uplink_bytes: int  # the outer's receive counter
    charged_bytes: int  # the inner's ledger, wire + timing
    tokens: int
    alarms: list[str]
    first_alarm_s: float | None  # seconds after the run started
    stopped_by: str
    note: str = ""
    timing_bytes: int = 0  # of charged_bytes, the timing charge (the timing channel's bound)


@dataclass
class DetectorRow:
    detector: str
    traffic: str
    temperature: float
    streams: int
    tokens: int
    alarms: int

    @property
    def false_positive_rate(self) -> float:
        return self.alarms / self.streams if self.streams else 0.0


@dataclass
class Report:
    settings: dict
    thresholds: dict
    bound: dict  # the honest bound: budget, and what detection leaves usable
    attacks: list[AttackRow] = field(default_factory=list)
    detectors: list[DetectorRow] = field(default_factory=list)

    def to_json(self) -> str:
        d = asdict(self)
        for row, det in zip(d["detectors"], self.detectors, strict=True):
            row["false_positive_rate"] = det.false_positive_rate
        return json.dumps(d, indent=1) + "\n"

    def to_markdown(self) -> str:
        out = ["# uplimit red-team report", ""]
        out += [
            "| attack | channel | secret reached the outer | where | uplink bytes |"
            " charged bytes | first alarm | alarms | stopped by |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.attacks:
            first = "none" if r.first_alarm_s is None else f"{r.first_alarm_s} s"
            kinds = sorted({a.split(":")[0] for a in r.alarms})
            out.append(
                f"| {r.attack} | {r.channel} | {r.moved_bytes:g} of {r.secret_bytes} B | {r.where}"
                f" | {r.uplink_bytes} | {r.charged_bytes} | {first} | {len(r.alarms)}"
                f" ({', '.join(kinds) or '-'}) | {r.stopped_by} |"
            )
        out += ["", "Notes:", ""]
        out += [f"- **{r.attack}**: {r.note}" for r in self.attacks if r.note]
        out += [
            "",
            "## Detectors on honest traffic",
            "",
            "| detector | traffic | T | streams | tokens | alarms | false-positive rate |",
            "|---|---|---|---|---|---|---|",
        ]
        for d in self.detectors:
            out.append(
                f"| {d.detector} | {d.traffic} | {d.temperature} | {d.streams} | {d.tokens}"
                f" | {d.alarms} | {d.false_positive_rate:.3f} |"
            )
        out += ["", "## The bound", ""]
        out += [f"- {k}: {v}" for k, v in self.bound.items()]
        out += [
            "",
            "## Settings",
            "",
            "```json",
            json.dumps(
                {"settings": self.settings, "monitor thresholds": self.thresholds}, indent=1
            ),
            "```",
            "",
        ]
        return "\n".join(out)

    def write(self, directory: str | Path) -> tuple[Path, Path]:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        md, js = d / "report.md", d / "report.json"
        md.write_text(self.to_markdown())
        js.write_text(self.to_json())
        return md, js
