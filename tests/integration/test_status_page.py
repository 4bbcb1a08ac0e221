"""The operator's status page on a running system (`serve_outer` + `serve_inner` on the tiny pair,
over the real transport), read as JSON and loaded in Debian's Chromium (headless, Playwright).

The screenshot stays as a test artifact: $UPLIMIT_ARTIFACTS/status-page.png, by default
build/test-artifacts/ in the repository.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import openai
import pytest

from support.net import free_port
from support.waiting import eventually, stop_task, wait_healthy
from uplimit.inner.serve import serve_inner
from uplimit.outer.serve import serve_outer

CHROMIUM = "/usr/bin/chromium"
ADMIN_KEY = "operator-secret"
CHARTS = ("burndown", "uplink", "bits_per_token", "meters.bytes")
# As root chromium needs no sandbox; the rest keeps it off this machine's closed network.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
ARTIFACTS = Path(
    os.environ.get("UPLIMIT_ARTIFACTS", Path(__file__).parents[2] / "build" / "test-artifacts")
)


def _at(data: dict, dotted: str) -> list:
    for key in dotted.split("."):
        data = data[key]
    return data


async def _load_in_chromium(url: str, key: str, shot: Path) -> dict:
    """Load the page as an operator's browser does (basic auth); what it drew and logged."""
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = await browser.new_context(
            http_credentials={"username": "operator", "password": key},
            viewport={"width": 1360, "height": 900},
        )
        page = await context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        requested: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        response = await page.goto(url, wait_until="load")
        data = json.loads(await page.locator("#status-data").text_content())
        drawn = {c: await page.locator(f'svg[data-chart="{c}"] .pt').count() for c in CHARTS}
        alarm_rows = await page.locator("#alarms tr td").count() // 3
        shot.parent.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(shot), full_page=True)
        await browser.close()
    return {"status": response.status, "errors": errors, "requested": requested,
            "data": data, "drawn": drawn, "alarm_rows": alarm_rows}  # fmt: skip


def test_status_page_draws_the_running_system(
    tiny_strong, tiny_weak, tiny_services_config, missing
):
    if not Path(CHROMIUM).exists():
        missing("browser", f"no {CHROMIUM} (make installs Debian's chromium as root)")
    port, metrics_port = free_port(), free_port()
    config = tiny_services_config(
        {"admin_key": ADMIN_KEY, "status_interval_s": 0.2, "port": port,
         "metrics_port": metrics_port}
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    bearer = {"Authorization": f"Bearer {ADMIN_KEY}"}

    async def main():
        outer = asyncio.create_task(serve_outer(config, tiny_weak))
        inner = asyncio.create_task(serve_inner(config, tiny_strong, tiny_weak))
        await wait_healthy(url)
        async with httpx.AsyncClient(base_url=url) as http:
            refused = [(await http.get(path)).status_code for path in ("/status", "/status.json")]
            wrong = (await http.get("/status.json", auth=("operator", "wrong"))).status_code
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            for temperature, seed in ((0.0, 1), (0.7, 2), (0.7, 3)):
                await client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "Hello!"}],
                    max_tokens=16, temperature=temperature, seed=seed,
                )  # fmt: skip
            await client.close()
            # A second uplink connection is refused and alarmed; the link keeps serving.
            _, writer = await asyncio.open_connection("127.0.0.1", config.link.uplink_port)
            writer.close()
            snapshot: dict = {}

            async def sampled_after_the_alarm() -> bool:
                snapshot.update((await http.get("/status.json", headers=bearer)).json())
                alarms, points = snapshot["alarms"], snapshot["burndown"]
                return bool(alarms) and len(points) >= 5 and points[-1]["at"] > alarms[0]["at"]

            await eventually(sampled_after_the_alarm, "a sample after the alarm")
            metrics = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        browser = await _load_in_chromium(f"{url}/status", ADMIN_KEY, ARTIFACTS / "status-page.png")
        await stop_task(outer)
        await asyncio.wait_for(inner, 30)
        return refused, wrong, snapshot, metrics, browser

    refused, wrong, s, metrics, browser = asyncio.run(main())
    assert refused == [401, 401] and wrong == 401  # behind the admin key

    # The figures are the system's own: the ledger (readable on this host) and the counter.
    assert s["link"]["state"] == "serving" and s["streams"] == []
    budget = s["budget"]
    assert budget["source"] == "ledger" and budget["lifetime_bytes"] == 1_000_000
    assert 0 < budget["used_bytes"] == 1_000_000 - budget["left_bytes"]
    received, ledger = s["meters"]["bytes"][1], s["meters"]["bytes"][0]
    assert (ledger["meter"], received["meter"]) == ("ledger", "received")
    assert 0 < received["bytes"] <= ledger["bytes"] <= budget["used_bytes"]
    assert s["meters"]["agree"] is True
    assert [c["name"] for c in s["meters"]["checks"]] == [
        "received <= charged", "charged <= lifetime budget",
    ]  # fmt: skip
    by_t = {r["temperature"]: r for r in s["bits_per_token"]}
    assert sorted(by_t) == [0.0, 0.7] and [by_t[0.0]["streams"], by_t[0.7]["streams"]] == [1, 2]
    for r in by_t.values():
        assert r["tokens"] > 0 and r["bits_per_token"] == pytest.approx(r["bits"] / r["tokens"])
    # Every stream's bits come from frames the counter counted (headers of frames aside).
    assert sum(r["bits"] for r in by_t.values()) <= 8 * received["bytes"]
    # The uplink's bits/s add up to the bytes received over the sampled window.
    points, up = s["burndown"], s["uplink"]
    assert len(points) >= 5 and len(up) == len(points) - 1
    assert sum(u["bits_per_s"] for u in up) > 0
    # The projection is the window's rate carried forward (status.py's module doc).
    used_first = 1_000_000 - points[0]["left_bytes"]
    rate = (budget["used_bytes"] - used_first) / (points[-1]["at"] - points[0]["at"])
    assert budget["rate_bytes_per_s"] == pytest.approx(rate)
    if rate > 0:
        assert budget["exhausts_at"] == pytest.approx(
            points[-1]["at"] + budget["left_bytes"] / rate
        )
    (alarm,) = s["alarms"]
    assert alarm["kind"] == "connection" and "to the uplink port" in alarm["message"]
    assert points[0]["at"] < alarm["at"] <= s["at"] and s["keys"] is None
    # Prometheus has the meters too, under conventional names.
    assert "uplimit_meters_agree 1.0" in metrics
    assert 'uplimit_alarms_total{kind="connection"} 1.0' in metrics
    assert 'uplimit_meter_bytes{meter="ledger"}' in metrics
    assert 'uplimit_meter_bytes{meter="received"}' in metrics

    # In the browser: no console error, nothing fetched from elsewhere, every point drawn.
    assert browser["status"] == 200 and browser["errors"] == []
    assert all(r.startswith(url) for r in browser["requested"]), browser["requested"]
    data = browser["data"]
    expected = {c: len(_at(data, c)) for c in CHARTS}
    assert browser["drawn"] == expected
    assert min(expected.values()) >= 1 and expected["meters.bytes"] == 2
    assert expected["bits_per_token"] == 2
    assert browser["alarm_rows"] == 1
    assert (ARTIFACTS / "status-page.png").stat().st_size > 10_000


def _status_of_an_outer_alone(weak, config, until, what: str) -> tuple[dict, str, str | None]:
    """Serve the outer alone (no inner connects), poll /status.json until `until(snapshot)`;
    returns that snapshot, the page, and the Prometheus text when metrics are on."""
    url = f"http://127.0.0.1:{config.outer.port}"

    async def main():
        outer = asyncio.create_task(serve_outer(config, weak))
        await wait_healthy(url, serving=False)
        async with httpx.AsyncClient(base_url=url) as http:
            snapshot: dict = {}

            async def reached() -> bool:
                snapshot.update((await http.get("/status.json")).json())  # no admin key: open
                return until(snapshot)

            await eventually(reached, what)
            page = (await http.get("/status")).text
            metrics = None
            if config.outer.metrics_port:
                metrics_url = f"http://127.0.0.1:{config.outer.metrics_port}/metrics"
                metrics = (await http.get(metrics_url)).text
        await stop_task(outer)
        return snapshot, page, metrics

    return asyncio.run(main())


def test_status_page_before_the_inner_connects(tiny_weak, tiny_services_config):
    """An outer alone: its own budget (the configured figure; the outer always has one) with
    nothing used, and the page says what it does not know instead of drawing guesses."""
    config = tiny_services_config(
        {"status_interval_s": 0.1, "port": free_port(), "metrics_port": free_port()},
        ledger=False,
    )
    s, page, metrics = _status_of_an_outer_alone(
        tiny_weak, config, lambda s: len(s["uplink"]) >= 1, "a first uplink sample"
    )
    assert s["link"]["state"] == "handshaking"
    assert s["budget"] == {
        "source": "receive counter", "lifetime_bytes": 1_000_000, "used_bytes": 0,
        "left_bytes": 1_000_000, "rate_bytes_per_s": 0.0, "exhausts_at": None,
    }  # fmt: skip
    assert s["meters"]["bytes"] == [{"meter": "received", "bytes": 0}]
    assert s["meters"]["checks"] == [] and s["meters"]["agree"] is None
    assert s["meters"]["error"] is None
    assert "not burning now: no exhaustion date" in page
    assert "fewer than two meters: nothing to compare" in page
    assert page.count('class="none">no data yet') == 1  # bits/token
    assert "uplimit_meters_agree NaN" in metrics


def test_a_meter_that_cannot_be_read_is_reported_not_drawn_as_zero(tiny_weak, tiny_services_config):
    config = tiny_services_config(
        {"status_interval_s": 0.1, "port": free_port(), "metrics_port": 0,
         "kernel_meter": "nosuchns"}, ledger=False,
    )  # fmt: skip
    s, page, _ = _status_of_an_outer_alone(
        tiny_weak, config, lambda s: s["meters"]["error"] is not None, "a failed meter read"
    )
    assert s["meters"]["error"]  # no such namespace (or no nft/ip to ask)
    assert s["burndown"] == [] and s["uplink"] == [] and s["budget"]["used_bytes"] is None
    assert "meter read failed: " in page
