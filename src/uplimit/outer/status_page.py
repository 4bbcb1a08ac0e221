"""The status page: `GET /status` (HTML) and `GET /status.json`, from `outer.status.StatusBoard`.

The page is one self-contained HTML document: inline CSS, charts drawn here as SVG, no script
and no outside asset, so it works offline and behind any proxy; it reloads itself every
`interval_s`. Every data point of a chart is one element of class `pt` inside
`<svg data-chart="NAME">`, NAME being the (dotted) key of its data in the snapshot, which the page
carries as JSON (`#status-data`; the browser test counts points against it).

With `[outer] admin_key` set, both routes want it: as a bearer token (scripts) or as the
password of HTTP basic authentication, any user name (a browser asks for it).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import html
import json
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from uplimit.outer.status import StatusBoard

__all__ = ["add_status_routes", "render"]

_W, _H = 640, 220  # chart size in px
_LEFT, _RIGHT, _TOP, _BOTTOM = 78, 14, 12, 28  # room for the axes' labels


def add_status_routes(app: FastAPI, board: StatusBoard, admin_key: str | None) -> None:
    """Register /status and /status.json on `app`."""

    def denied(request: Request) -> Response | None:
        if admin_key is None or _authorized(request.headers.get("authorization", ""), admin_key):
            return None
        return Response(
            "the status page wants the admin key",
            status_code=401,
            headers={"WWW-Authenticate": 'Basic realm="uplimit status"'},
        )

    @app.get("/status.json")
    async def status_json(request: Request) -> Response:
        return denied(request) or JSONResponse(board.snapshot())

    @app.get("/status")
    async def status_html(request: Request) -> Response:
        return denied(request) or HTMLResponse(render(board.snapshot()))


def _authorized(header: str, key: str) -> bool:
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return secrets.compare_digest(value.encode(), key.encode())


# --- formatting -------------------------------------------------------------------------------


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.4g} {prefix}{unit}"
    return f"{value:.4g} {unit}"


def _bytes(value: float | None) -> str:
    return "unknown" if value is None else _si(value, "B")


def _n(value: float | None) -> str:
    return "unknown" if value is None else f"{value:,} bytes"


def _exact_bytes(value: float) -> str:
    # the burn-down moves by bytes against a budget of millions: rounding would hide it
    return f"{value:,.0f} B"


def _bits_per_s(value: float) -> str:
    return _si(value, "bit/s")


def _time(at: float, with_date: bool = False) -> str:
    fmt = "%Y-%m-%d %H:%M:%S UTC" if with_date else "%H:%M:%S"
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime(fmt)


def _json(value: object) -> str:
    # "<" escaped, so no string in the data can close the script element
    return json.dumps(value).replace("<", "\\u003c")


def _esc(value: object) -> str:
    return html.escape(str(value))


# --- charts -----------------------------------------------------------------------------------


def _svg(name: str, body: list[str], title: str) -> str:
    return (
        f'<svg data-chart="{name}" role="img" aria-label="{_esc(title)}" width="{_W}"'
        f' height="{_H}" viewBox="0 0 {_W} {_H}">{"".join(body)}</svg>'
    )


def _empty(name: str, title: str) -> str:
    text = f'<text x="{_W / 2}" y="{_H / 2}" class="none">no data yet</text>'
    return _svg(name, [text], title)


def _scale(lo: float, hi: float, a: float, b: float) -> Callable[[float], float]:
    if hi <= lo:  # one value: put it in the middle
        return lambda v: (a + b) / 2
    return lambda v: a + (v - lo) * (b - a) / (hi - lo)


def line_chart(
    name: str,
    points: Sequence[tuple[float, float]],
    title: str,
    y_fmt: Callable[[float], str],
    projection: tuple[float, float] | None = None,
) -> str:
    """(time, value) points as a line with a dot each; `projection` is a dashed extension
    from the last point to (time, value)."""
    if not points:
        return _empty(name, title)
    xs = [p[0] for p in points] + ([projection[0]] if projection else [])
    ys = [p[1] for p in points] + ([projection[1]] if projection else [])
    x = _scale(min(xs), max(xs), _LEFT, _W - _RIGHT)
    y_lo, y_hi = min(ys), max(ys)
    pad = (y_hi - y_lo) * 0.08 or max(abs(y_hi) * 0.05, 1.0)
    y = _scale(y_lo - pad, y_hi + pad, _H - _BOTTOM, _TOP)
    body = [f'<line class="axis" x1="{_LEFT}" y1="{_H - _BOTTOM}" x2="{_W - _RIGHT}"'
            f' y2="{_H - _BOTTOM}"/>']  # fmt: skip
    for v in (y_lo, (y_lo + y_hi) / 2, y_hi):
        body.append(f'<text class="tick" x="{_LEFT - 6}" y="{y(v) + 4:.1f}"'
                    f' text-anchor="end">{_esc(y_fmt(v))}</text>')  # fmt: skip
        body.append(f'<line class="grid" x1="{_LEFT}" y1="{y(v):.1f}" x2="{_W - _RIGHT}"'
                    f' y2="{y(v):.1f}"/>')  # fmt: skip
    for t, anchor in ((min(xs), "start"), (max(xs), "end")):
        body.append(f'<text class="tick" x="{x(t):.1f}" y="{_H - 8}"'
                    f' text-anchor="{anchor}">{_time(t)}</text>')  # fmt: skip
    coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
    body.append(f'<polyline class="line" points="{coords}"/>')
    if projection is not None:
        (t0, v0), (t1, v1) = points[-1], projection
        body.append(f'<line class="projection" x1="{x(t0):.1f}" y1="{y(v0):.1f}"'
                    f' x2="{x(t1):.1f}" y2="{y(v1):.1f}"/>')  # fmt: skip
    for t, v in points:
        body.append(f'<circle class="pt" cx="{x(t):.1f}" cy="{y(v):.1f}" r="2.5">'
                    f"<title>{_time(t)}: {_esc(y_fmt(v))}</title></circle>")  # fmt: skip
    return _svg(name, body, title)


def bar_chart(
    name: str, bars: Sequence[tuple[str, float]], title: str, y_fmt: Callable[[float], str]
) -> str:
    """Labelled bars from zero, each with its value written above it."""
    if not bars:
        return _empty(name, title)
    top = max(v for _, v in bars) or 1.0
    y = _scale(0, top * 1.15, _H - _BOTTOM, _TOP)
    slot = (_W - _LEFT - _RIGHT) / len(bars)
    width = min(slot * 0.6, 90)
    body = [f'<line class="axis" x1="{_LEFT}" y1="{_H - _BOTTOM}" x2="{_W - _RIGHT}"'
            f' y2="{_H - _BOTTOM}"/>']  # fmt: skip
    for i, (label, v) in enumerate(bars):
        cx = _LEFT + slot * (i + 0.5)
        body.append(f'<rect class="pt" x="{cx - width / 2:.1f}" y="{y(v):.1f}" width="{width:.1f}"'
                    f' height="{y(0) - y(v):.1f}"><title>{_esc(label)}: {_esc(y_fmt(v))}</title>'
                    "</rect>")  # fmt: skip
        body.append(f'<text class="tick" x="{cx:.1f}" y="{y(v) - 5:.1f}"'
                    f' text-anchor="middle">{_esc(y_fmt(v))}</text>')  # fmt: skip
        body.append(f'<text class="tick" x="{cx:.1f}" y="{_H - 8}"'
                    f' text-anchor="middle">{_esc(label)}</text>')  # fmt: skip
    return _svg(name, body, title)


# --- the page ---------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.2em auto;max-width:1340px;color:#1d2327;
 background:#f6f7f7}
h1{font-size:20px;margin:0 0 .6em} h2{font-size:15px;margin:0 0 .4em}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(660px,1fr));gap:12px}
section{background:#fff;border:1px solid #dcdcde;border-radius:6px;padding:10px 12px}
.big{font-size:22px;font-weight:600} .ok{color:#00712e} .bad{color:#b32d2e}
table{border-collapse:collapse;width:100%} td,th{text-align:left;padding:2px 8px 2px 0;
 border-bottom:1px solid #f0f0f1;vertical-align:top} th{font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}
svg .line{fill:none;stroke:#2271b1;stroke-width:1.6} svg .pt{fill:#2271b1}
svg .projection{stroke:#b32d2e;stroke-dasharray:5 4;stroke-width:1.6}
svg .axis{stroke:#8c8f94} svg .grid{stroke:#f0f0f1} svg .tick{font-size:11px;fill:#50575e}
svg .none{font-size:13px;fill:#8c8f94;text-anchor:middle} .muted{color:#646970}
"""


def _rows(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: set[int]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{_esc(c)}</td>' if i in numeric else f"<td>{_esc(c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _budget(s: dict[str, Any]) -> str:
    b = s["budget"]
    used, total, left = b["used_bytes"], b["lifetime_bytes"], b["left_bytes"]
    share = f" ({100 * used / total:.3g} % used)" if used is not None and total else ""
    if b["exhausts_at"] is not None:
        when = f"exhausted about {_time(b['exhausts_at'], with_date=True)} at the current rate"
    elif total is None:
        when = (
            "no projection: the budget is the inner's default ([link] lifetime_budget_bytes = 0)"
            " and its ledger is not readable here"
        )
    elif b["rate_bytes_per_s"] is None:
        when = "no projection yet: it needs two samples"
    else:
        when = "not burning now: no exhaustion date"
    projection = None
    points = [(p["at"], p["left_bytes"]) for p in s["burndown"]]
    if points and b["rate_bytes_per_s"]:
        span = max(points[-1][0] - points[0][0], s["interval_s"])
        end = points[-1][0] + 0.25 * span
        projection = (end, max(points[-1][1] - b["rate_bytes_per_s"] * (end - points[-1][0]), 0))
    rate = b["rate_bytes_per_s"]
    return (
        "<section><h2>Lifetime budget</h2>"
        f'<div class="big">{_esc(_bytes(left))} left</div>'
        f"<div>{_esc(_n(used))} used of {_esc(_n(total))}{_esc(share)};"
        f" source: {_esc(b['source'])}</div>"
        f"<div>burn rate {_esc('unknown' if rate is None else _si(rate, 'B/s'))}; {_esc(when)}"
        "</div>"
        + line_chart("burndown", points, "budget left over time", _exact_bytes, projection)
        + "</section>"
    )


def _uplink(s: dict[str, Any]) -> str:
    points = [(p["at"], p["bits_per_s"]) for p in s["uplink"]]
    return (
        "<section><h2>Uplink bits/s</h2>"
        f'<div class="muted">the receive counter, sampled every {s["interval_s"]:g} s</div>'
        + line_chart("uplink", points, "uplink bits per second", _bits_per_s)
        + "</section>"
    )


def _bits_per_token(s: dict[str, Any]) -> str:
    rows = s["bits_per_token"]
    bars = [(f"T={r['temperature']:g}", r["bits_per_token"]) for r in rows]
    cells = [
        (f"{r['temperature']:g}", r["streams"], r["tokens"], f"{r['bits']:.0f}",
         f"{r['bits_per_token']:.3f}")
        for r in rows
    ]  # fmt: skip
    table = _rows(("temperature", "streams", "tokens", "bits", "bits/token"), cells, {1, 2, 3, 4})
    return (
        "<section><h2>Bits/token by temperature</h2>"
        '<div class="muted">finished streams, every uplink bit included (frame overhead'
        " shared by tokens)</div>"
        + bar_chart("bits_per_token", bars, "bits per token by temperature", lambda v: f"{v:.3f}")
        + table
        + "</section>"
    )


def _meters(s: dict[str, Any]) -> str:
    m = s["meters"]
    bars = [(r["meter"], r["bytes"]) for r in m["bytes"]]
    if not m["checks"]:
        verdict = '<div class="big muted">fewer than two meters: nothing to compare</div>'
    elif m["agree"]:
        verdict = '<div class="big ok">the meters agree</div>'
    else:
        verdict = '<div class="big bad">the meters DISAGREE</div>'
    checks = "".join(
        f'<li class="{"ok" if c["ok"] else "bad"}">{"agree" if c["ok"] else "DISAGREE"}:'
        f" {_esc(c['name'])}: {_esc(c['detail'])}</li>"
        for c in m["checks"]
    )
    error = f'<div class="bad">meter read failed: {_esc(m["error"])}</div>' if m["error"] else ""
    return (
        "<section><h2>Meters side by side</h2>"
        + verdict
        + error
        + bar_chart("meters.bytes", bars, "uplink bytes by meter", _bytes)
        + f"<ul>{checks}</ul>"
        + _rows(("meter", "bytes", ""), m["figures"], {1})
        + "</section>"
    )


def _link(s: dict[str, Any]) -> str:
    link = s["link"]
    cls = "ok" if link["state"] == "serving" else "bad"
    cells = [
        (r["stream_id"], r["request_id"], f"{r['temperature']:g}", r["tokens"], r["max_tokens"],
         f"{r['bits']:.0f}")
        for r in s["streams"]
    ]  # fmt: skip
    streams = _rows(("stream", "request", "T", "tokens", "max", "bits"), cells, {0, 3, 4, 5})
    reason = _esc(link["reason"]) if link["reason"] not in ("", link["state"]) else ""
    return (
        "<section><h2>Link</h2>"
        f'<div class="big {cls}">{_esc(link["state"])}</div><div>{reason}</div>'
        f"<h2>Active streams: {len(s['streams'])}</h2>{streams}</section>"
    )


def _alarms(s: dict[str, Any]) -> str:
    alarms = s["alarms"]
    head = (
        f'<div class="big bad">{len(alarms)} alarm(s)</div>'
        if alarms
        else '<div class="big ok">no alarms</div>'
    )
    table = _rows(
        ("time", "kind", "what"),
        [(_time(a["at"], with_date=True), a["kind"], a["message"]) for a in alarms],
        set(),
    )
    return f'<section id="alarms"><h2>Alarms</h2>{head}{table}</section>'


def _keys() -> str:
    # Issue #16 brings API keys per client; their usage goes here and in snapshot["keys"].
    return (
        '<section><h2>Usage per API key</h2><div class="muted">not tracked yet: API keys per'
        " client come with issue #16</div></section>"
    )


def render(snapshot: dict[str, Any]) -> str:
    """The whole page for one `StatusBoard.snapshot()`."""
    s = snapshot
    refresh = max(int(s["interval_s"]), 2)
    return (
        '<!doctype html><html lang=en><head><meta charset=utf-8><link rel=icon href="data:,">'
        f'<meta http-equiv="refresh" content="{refresh}">'
        f"<title>uplimit status</title><style>{_CSS}</style></head><body>"
        f"<h1>uplimit status <span class=muted>{_time(s['at'], with_date=True)}</span></h1>"
        '<div class="grid2">'
        + _budget(s)
        + _uplink(s)
        + _meters(s)
        + _bits_per_token(s)
        + _link(s)
        + _alarms(s)
        + _keys()
        + '</div><p class="muted">JSON: <a href="status.json">/status.json</a></p>'
        # the figures drawn, as data (not run): a check can hold the charts against them
        + f'<script type="application/json" id="status-data">{_json(s)}</script></body></html>'
    )
