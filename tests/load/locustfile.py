"""Users of the API under load (locust): valid requests, whole and streamed, mixed with invalid
ones (`tests/integration/test_api_load.py` runs it against the served system).

Every answer is checked. A valid request must be answered in full: 200 with a finish_reason,
and a streamed one to its `data: [DONE]`. An invalid one must get its 4xx, OpenAI-shaped.
A 429 with `Retry-After` and OpenAI's shape is back-pressure, an answer and not a loss: the
user waits as told and asks again (as the openai client does), up to `RETRIES` times, then
takes the 429 as its answer. Anything else (a 5xx, a dropped connection, a cut stream, a 429
without `Retry-After`) is a lost answer: a locust failure.
At the end the answers by status go to UPLIMIT_LOAD_STATUS (JSON).

Environment: UPLIMIT_LOAD_MODEL (the served model's name), UPLIMIT_LOAD_KEY (its API key, if
any), UPLIMIT_LOAD_STATUS (where the counts go).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter

from locust import FastHttpUser, between, events, task

MODEL = os.environ.get("UPLIMIT_LOAD_MODEL", "tiny")
KEY = os.environ.get("UPLIMIT_LOAD_KEY", "")
STATUSES: Counter[int] = Counter()
CHAT = [{"role": "user", "content": "Write one line of Python."}]
RETRIES = 5  # 429s one request waits out before it takes the last as its answer

# (body, expected status) of requests a careless or hostile client sends
INVALID = [
    ({"model": MODEL, "messages": CHAT, "top_k": 2**32 + 1}, 400),
    ({"model": MODEL, "messages": CHAT, "temperature": 9}, 400),
    ({"model": MODEL, "messages": CHAT, "max_tokens": 10**9}, 400),
    ({"model": MODEL, "messages": CHAT, "stop": ["a"] * 5}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "a\ud800"}]}, 400),
    ({"model": MODEL, "messages": []}, 400),
    ({"model": "gpt-4o", "messages": CHAT}, 404),
]


class ApiUser(FastHttpUser):
    wait_time = between(0.0, 0.2)
    network_timeout = 600.0
    connection_timeout = 60.0

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {KEY}"} if KEY else {}

    def post(self, name: str, body: object, expect: int, *, stream: bool = False) -> None:
        data = json.dumps(body).encode("utf-8", "surrogatepass")
        headers = {**self.headers(), "content-type": "application/json"}
        for attempt in range(RETRIES + 1):
            with self.client.post(
                "/v1/" + name.split()[0], data=data, headers=headers, name=name, catch_response=True
            ) as r:
                STATUSES[r.status_code] += 1
                retry_after = r.headers.get("retry-after") if r.status_code == 429 else None
                if retry_after is not None and attempt < RETRIES:
                    r.success()  # back-pressure: told when to come back
                else:
                    problem = self.check(r, 429 if retry_after else expect, stream)
                    if problem:
                        r.failure(f"{r.status_code}: {problem}")
                    else:
                        r.success()
                    return
            time.sleep(float(retry_after))

    @staticmethod
    def check(r, expect: int, stream: bool) -> str | None:
        if r.status_code != expect:
            return f"expected {expect}: {(r.text or '')[:200]}"
        if expect != 200:
            error = r.json().get("error", {})
            return None if {"message", "type", "param", "code"} <= set(error) else "not OpenAI"
        if stream:
            lines = [x for x in r.text.split("\n\n") if x]
            if not lines or lines[-1] != "data: [DONE]":
                return "the stream was cut"
            return None if '"finish_reason": "' in r.text else "no finish_reason"
        return None if r.json()["choices"][0]["finish_reason"] else "no finish_reason"

    @task(4)
    def chat(self) -> None:
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 8, "temperature": 0.7}
        self.post("chat/completions", body, 200)

    @task(2)
    def chat_streamed(self) -> None:
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 8, "stream": True, "n": 2}
        self.post("chat/completions streamed", body, 200, stream=True)

    @task(1)
    def completion(self) -> None:
        self.post("completions", {"model": MODEL, "prompt": "def f(x):", "max_tokens": 8}, 200)

    @task(3)
    def invalid(self) -> None:
        body, status = random.choice(INVALID)
        self.post("chat/completions invalid", body, status)


@events.test_stop.add_listener
def _write_statuses(**_: object) -> None:
    path = os.environ.get("UPLIMIT_LOAD_STATUS")
    if path:
        with open(path, "w") as f:
            json.dump(dict(STATUSES), f)
