"""The public API fuzzed from its own OpenAPI schema with Schemathesis (#16 item 7), over real
sockets and the real transport (the tiny pair, `serve_outer` + `serve_inner`).

Requests that follow the schema and requests that break it, on every operation: none may get a
5xx, every error is OpenAI-shaped, and the link serves throughout. The figures (requests,
answers by status, p95 latency) are printed for the record.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import openapi
from schemathesis.generation import GenerationMode

from support.api_stack import api_config, served_api

KEY = "sk-fuzz-0123456789"
REQUESTS = 1_100


@pytest.fixture(scope="module")
def api(tiny_pair_dirs, tiny_strong, tiny_weak, tmp_path_factory) -> Iterator[str]:
    config = api_config(tiny_pair_dirs, tmp_path_factory.mktemp("fuzz"), outer={"api_key": KEY})
    with served_api(config, tiny_strong, tiny_weak) as url:
        yield url


def test_schemathesis_finds_no_server_error(api):
    schema = openapi.from_dict(httpx.get(f"{api}/openapi.json").json())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6  # chat, completions, models, a model, health, withheld
    cases = st.one_of(
        op.as_strategy(generation_mode=mode)
        for op in operations
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    )
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    session = requests.Session()
    session.headers["authorization"] = f"Bearer {KEY}"

    @settings(
        max_examples=REQUESTS, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=cases, ours=st.booleans())
    def fuzz(case, ours):
        # Half the bodies name this server's model, with short answers: they reach the inner.
        if ours and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = "tiny"
            case.body["max_tokens"] = 4
        start = time.perf_counter()
        response = case.call(base_url=api, session=session, timeout=60)
        latencies.append(time.perf_counter() - start)
        statuses[response.status_code] += 1
        assert response.status_code < 500, (case.as_curl_command(), response.text)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}

    fuzz()
    latencies.sort()
    p95 = latencies[int(0.95 * len(latencies))]
    by_status = dict(sorted(statuses.items()))
    total = sum(statuses.values())
    print(f"\nschemathesis: {total} requests, by status {by_status}, p95 {1000 * p95:.0f} ms")
    assert total >= 1_000
    assert statuses[200] > 0  # some reached the inner and were served
    assert httpx.get(f"{api}/health").status_code == 200
