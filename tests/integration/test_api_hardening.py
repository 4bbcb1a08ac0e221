"""The public API survives its users (#16), over real sockets and the real transport: the
tiny pair served by `serve_outer` + `serve_inner` on two metered TCP connections.

Whatever a client sends, it gets a 2xx or an OpenAI-shaped 4xx, and the link keeps serving
everyone else; what the link's state says to users is a fixed text (#15, item 5).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import httpx
import openai
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from support.api_stack import api_config, served_api
from uplimit.config import Config
from uplimit.outer.api_errors import LINK_TEXT, link_error
from uplimit.wire.limits import MAX_BEST_OF, MAX_STOP_BYTES, MAX_STOPS, MAX_TOP_K
from uplimit.wire.receiver import LinkState

KEY = "sk-test-0123456789"
ADMIN = "admin-0123456789"
AUTH = {"authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def api(tiny_pair_dirs, tiny_strong, tiny_weak, tmp_path_factory) -> Iterator[str]:
    """The served system with an API key, shared by this module's fast tests."""
    config = api_config(
        tiny_pair_dirs, tmp_path_factory.mktemp("api"), outer={"api_key": KEY, "admin_key": ADMIN}
    )
    with served_api(config, tiny_strong, tiny_weak) as url:
        yield url


@pytest.fixture
def http(api) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api, headers=AUTH, timeout=60) as client:
        yield client


def openai_shaped(r: httpx.Response) -> dict:
    """The error of an OpenAI-shaped error response (asserting the shape)."""
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def serves(http: httpx.Client) -> None:
    """The link serves, and a plain request is answered."""
    assert http.get("/health").json() == {"link": "serving", "message": LINK_TEXT["serving"]}
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "max_tokens": 3})
    assert r.status_code == 200, r.text


# --- arbitrary JSON: a 4xx, or a stream the inner accepts -----------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _mostly(valid: st.SearchStrategy, wild: st.SearchStrategy = _json) -> st.SearchStrategy:
    """Values a client means (at and past the edges) 4 times in 5, anything JSON else."""
    return st.one_of(valid, valid, valid, valid, wild)


_text = _mostly(
    st.text(max_size=12)
    | st.text(min_size=250, max_size=300)  # around the stop sequences' 256 bytes
    | st.sampled_from(["\ud800x", "<|im_end|>", "", "\x00", "\U0001f600" * 70])
)
_message = st.fixed_dictionaries(
    {
        "role": _mostly(st.sampled_from(["user", "system", "assistant", "developer", "tool"])),
        "content": _text
        | st.lists(st.fixed_dictionaries({"type": _mostly(st.just("text")), "text": _text})),
    },
)
# Values a client means, at and past the edges of the limits.
_edges = {
    "temperature": st.floats(-0.5, 2.5) | st.floats(),
    "top_p": st.floats(-0.5, 1.5) | st.floats(),
    "top_k": st.sampled_from([-1, 0, 40, MAX_TOP_K, MAX_TOP_K + 1, 2**64]) | st.integers(),
    "max_tokens": st.integers(-1, 300) | st.integers(-(2**70), 2**70),
    "max_completion_tokens": st.integers(-1, 300),
    "seed": st.integers(-(2**70), 2**70),
    "n": st.integers(-1, 10),
    "best_of": st.sampled_from([0, 1, 8, 9, MAX_BEST_OF, MAX_BEST_OF + 1]) | st.integers(),
    "stop": _text | st.lists(_text, max_size=6),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "logprobs": st.just(False) | st.booleans(),
    "user": _text,
    "metadata": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
}
_common = {name: _mostly(valid) for name, valid in _edges.items()}
_model = _mostly(st.just("tiny"), _text)
_chat = st.fixed_dictionaries(
    {"model": _model, "messages": _mostly(st.lists(_message, min_size=1, max_size=3))},
    optional=_common,
)
_prompt = _mostly(
    _text | st.lists(st.integers(-5, 200_000), max_size=5) | st.lists(_text, max_size=2)
)
_completion = st.fixed_dictionaries({"model": _model, "prompt": _prompt}, optional=_common)
# A plain request with one or two parameters at their edges: most reach the inner.
_near_valid = st.lists(
    st.sampled_from(sorted(_edges)), min_size=1, max_size=2, unique=True
).flatmap(
    lambda names: st.fixed_dictionaries(
        {"model": st.just("tiny"), "messages": st.just(CHAT), **{n: _edges[n] for n in names}}
    )
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    request=st.tuples(st.just("/v1/chat/completions"), _chat)
    | st.tuples(st.just("/v1/completions"), _completion)
    | st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), _json)
    | st.tuples(st.just("/v1/chat/completions"), _near_valid)
)
@example(("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "top_k": MAX_TOP_K + 1}))
@example(("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "top_k": MAX_TOP_K}))
# A temperature so small that logits / T overflow: once the inner failed on it, link and all.
@example(("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "temperature": 5e-324}))
@example(("/v1/completions", {"model": "tiny", "prompt": "x", "best_of": MAX_BEST_OF + 1}))
@example(("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["s"] * (MAX_STOPS + 1)}))
@example(("/v1/completions", {"model": "tiny", "prompt": "x", "stop": "é" * MAX_STOP_BYTES}))
@example(("/v1/completions", {"model": "tiny", "prompt": [1] * 300, "max_tokens": 1}))
def test_any_json_request_is_a_4xx_or_served(http, request):
    """#16 item 1: a client's request is refused with a 4xx naming its error, or it reaches
    the inner, which accepts it (an inner that refused one would end the link: the next
    check would see it). Streams are capped to 4 tokens so that the run stays short."""
    path, body = request
    if isinstance(body, dict):
        for name in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(name), int):
                body[name] = min(body[name], 4)
        if "max_completion_tokens" not in body:
            body.setdefault("max_tokens", 4)
    r = http.post(
        path,
        content=json.dumps(body).encode("utf-8", "surrogatepass"),
        headers={"content-type": "application/json"},
    )
    event(f"status {r.status_code} {r.json()['error']['param'] if r.status_code != 200 else ''}")
    assert r.status_code in (200, 400, 404), r.text
    if r.status_code != 200:
        openai_shaped(r)
    assert http.get("/health").status_code == 200


# --- hostile HTTP --------------------------------------------------------------------------


def raw(url: str, request: bytes, timeout: float = 10) -> tuple[int, bytes]:
    """Send `request` as the bytes on a fresh connection; the status and body of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        with contextlib.suppress(ConnectionError):  # answered and closed before all was read
            s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = [
                int(h.split(b":")[1])
                for h in head.split(b"\r\n")
                if h.lower().startswith(b"content-length:")
            ]
            if length and len(body) >= length[0]:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def post(path: str, body: bytes, headers: dict[str, bytes] | None = None) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1".encode(),
        b"host: x",
        b"connection: close",
        f"content-length: {len(body)}".encode(),
        b"content-type: application/json",
    ]
    lines += [
        k.encode() + b": " + v
        for k, v in {"authorization": AUTH["authorization"].encode(), **(headers or {})}.items()
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chat_body(**fields: object) -> bytes:
    return json.dumps({"model": "tiny", "messages": CHAT, "max_tokens": 3, **fields}).encode()


HOSTILE = {
    # (request bytes, expected status, expected error code)
    "top_k past the protocol": (
        post("/v1/chat/completions", chat_body(top_k=2**32 + 1)),
        400,
        "invalid_value",
    ),
    "lone surrogate in a message": (
        post(
            "/v1/chat/completions",
            b'{"model":"tiny","messages":[{"role":"user","content":"a\\ud800b"}]}',
        ),
        400,
        "invalid_json",
    ),
    "lone surrogate in a stop": (
        post("/v1/chat/completions", chat_body(stop="\ud800")),
        400,
        "invalid_json",
    ),
    "Latin-1 body": (
        post("/v1/chat/completions", chat_body(user="é").replace(b"\\u00e9", b"\xe9")),
        400,
        "invalid_json",
    ),
    "overlong UTF-8": (
        post("/v1/chat/completions", chat_body(user="/").replace(b'"/"', b'"\xc0\xaf"')),
        400,
        "invalid_json",
    ),
    "UTF-16 body": (
        post("/v1/completions", json.dumps({"model": "tiny", "prompt": "x"}).encode("utf-16")),
        400,
        "invalid_json",
    ),
    "NaN": (
        post(
            "/v1/chat/completions", chat_body().replace(b'"max_tokens": 3', b'"temperature": NaN')
        ),
        400,
        "invalid_json",
    ),
    "deep JSON": (
        post(
            "/v1/chat/completions",
            b'{"model":"tiny","metadata":' + b"[" * 5000 + b"]" * 5000 + b"}",
        ),
        400,
        "invalid_json",
    ),
    "not JSON": (post("/v1/chat/completions", b"{model: tiny"), 400, "invalid_json"),
    "missing messages": (post("/v1/chat/completions", b'{"model":"tiny"}'), 400, "invalid_value"),
    "body over the cap": (
        post("/v1/completions", b'{"model":"tiny","prompt":"' + b"a" * 200_000 + b'"}'),
        413,
        "request_too_large",
    ),
    "chunked body over the cap": (
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
        b"authorization: "
        + AUTH["authorization"].encode()
        + b"\r\n\r\n"
        + (b"8000\r\n" + b"a" * 0x8000 + b"\r\n") * 4
        + b"0\r\n\r\n",
        413,
        "request_too_large",
    ),
    "Content-Length over the cap": (
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 999999999\r\n"
        b"authorization: " + AUTH["authorization"].encode() + b"\r\n\r\n{",
        413,
        "request_too_large",
    ),
    "non-ASCII Authorization": (
        post("/v1/chat/completions", chat_body(), {"authorization": b"Bearer sk-\xe9\xff"}),
        401,
        "invalid_api_key",
    ),
    "malformed Authorization": (
        post("/v1/chat/completions", chat_body(), {"authorization": b"Basic " + KEY.encode()}),
        401,
        "invalid_api_key",
    ),
    "non-ASCII admin key": (
        post("/admin/rollout", b"{}", {"authorization": b"Bearer \xe9"}),
        401,
        "invalid_api_key",
    ),
    "unknown route": (post("/v1/engines", chat_body()), 404, None),
    "wrong method": (
        b"DELETE /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
        b"authorization: " + AUTH["authorization"].encode() + b"\r\n\r\n",
        405,
        None,
    ),
    "context exceeded": (
        post("/v1/chat/completions", chat_body(max_tokens=10_000)),
        400,
        "context_length_exceeded",
    ),
    "n past the limit": (post("/v1/chat/completions", chat_body(n=10_000)), 400, "invalid_value"),
    "token id outside the vocabulary": (
        post("/v1/completions", b'{"model":"tiny","prompt":[1, 99999999999]}'),
        400,
        "invalid_value",
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_is_a_clear_4xx_and_the_link_serves_on(api, http, name):
    request, status, code = HOSTILE[name]
    got, body = raw(api, request)
    assert got == status, body
    error = openai_shaped(httpx.Response(got, content=body))
    assert error["code"] == code
    serves(http)


def test_withheld_reasoning_is_the_operators(api, tiny_pair_dirs, tiny_strong, tiny_weak, tmp_path):
    """Retrieving withheld reasoning uploads it (charged): the admin key's action, not a
    user's; a server without an admin key does not serve it at all."""
    with httpx.Client(base_url=api, timeout=10) as http:
        path, body = "/v1/uplimit/withheld", {"id": "chatcmpl-x/1"}
        r = http.post(path, json=body, headers=AUTH)
        assert r.status_code == 401 and openai_shaped(r)["code"] == "invalid_api_key"
        r = http.post(path, json=body, headers={"authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 400  # this server keeps no reasoning inside: it got that far
    config = api_config(tiny_pair_dirs, tmp_path)
    with served_api(config, tiny_strong, tiny_weak) as url:
        r = httpx.post(f"{url}/v1/uplimit/withheld", json=body)
        assert r.status_code == 404 and openai_shaped(r)["code"] == "not_found"


def test_the_api_key_is_checked_on_every_v1_route(api):
    with httpx.Client(base_url=api, timeout=10) as anon:
        for path in ("/v1/models", "/v1/chat/completions"):
            r = anon.post(path, json={}) if "chat" in path else anon.get(path)
            assert r.status_code == 401 and openai_shaped(r)["code"] == "invalid_api_key"
        wrong = {"authorization": f"Bearer {KEY[:-1]}x"}
        assert anon.get("/v1/models", headers=wrong).status_code == 401
        assert anon.get("/v1/models", headers=AUTH).status_code == 200
        assert anon.get("/health").status_code == 200  # no key: monitoring


# --- OpenAI's clients -------------------------------------------------------------------------


def test_what_openai_clients_send_is_accepted(api):
    """#16 item 6, with the official client: content parts, max_completion_tokens,
    stream_options, user, metadata, store, n with streaming, stop as a string."""
    client = openai.OpenAI(base_url=f"{api}/v1", api_key=KEY, max_retries=0)
    parts = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}],
        },
    ]
    r = client.chat.completions.create(
        model="tiny",
        messages=parts,
        max_completion_tokens=5,
        user="u-1",
        metadata={"team": "a"},
        store=False,
        stop="\n\n",
        seed=1,
        temperature=0.5,
    )
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 5
    stream = client.chat.completions.create(
        model="tiny",
        messages=CHAT,
        max_tokens=4,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        temperature=1.0,
    )
    seen, usage = set(), None
    for chunk in stream:
        seen |= {c.index for c in chunk.choices}
        usage = chunk.usage or usage
    assert seen == {0, 1} and usage is not None and usage.completion_tokens <= 8
    c = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=4, stop="\n")
    assert c.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=CHAT, logprobs=True)
    assert e.value.code == "invalid_value" and e.value.param == "logprobs"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    client.close()


def test_the_async_openai_client(api):
    import asyncio

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{api}/v1", api_key=KEY, max_retries=0)
        rs = await asyncio.gather(
            *(
                client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, seed=i)
                for i in range(4)
            )
        )
        stream = await client.completions.create(
            model="tiny", prompt="x", max_tokens=3, stream=True
        )
        texts = [c.choices[0].text async for c in stream if c.choices]
        await client.close()
        return rs, texts

    rs, texts = asyncio.run(main())
    assert all(r.choices[0].message.content is not None for r in rs) and texts


# --- the link's state, in fixed texts ---------------------------------------------------------


def inner_beside(
    config: Config, pair_dirs: tuple[Path, Path], tmp_path: Path, **sections: dict
) -> Config:
    """An inner's own config on `config`'s link (its ports, and its secret, so the inner
    proves itself), with `sections` changed, under tmp_path/inner."""
    link = {
        "downlink_port": config.link.downlink_port,
        "uplink_port": config.link.uplink_port,
        "secret_file": config.link.secret_file,
    }
    (tmp_path / "inner").mkdir()
    return api_config(pair_dirs, tmp_path / "inner", link=link, **sections)


def test_a_failed_link_says_only_a_fixed_text(tiny_pair_dirs, tiny_strong, tiny_weak, tmp_path):
    """#15 item 5: an inner whose codec differs refuses the link with its own fingerprint
    values (bytes the inner chose). Users read a fixed text; the values stay out of every
    body, in /health and in the 503."""
    config = api_config(tiny_pair_dirs, tmp_path)
    # Another frame size: the inner refuses with its value ("5").
    inner_config = inner_beside(config, tiny_pair_dirs, tmp_path, coding={"frame_tokens": 5})
    with (
        served_api(config, tiny_strong, tiny_weak, inner_config=inner_config, serving=False) as url,
        httpx.Client(base_url=url, timeout=10) as http,
    ):
        deadline = time.monotonic() + 60
        while (health := http.get("/health")).json()["link"] != "failed":
            assert time.monotonic() < deadline, health.text
            time.sleep(0.1)
        assert health.status_code == 503
        assert health.json() == {"link": "failed", "message": LINK_TEXT[LinkState.FAILED]}
        r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT})
        assert r.status_code == 503
        assert r.json() == link_error(LinkState.FAILED).body()


# --- slow streams: hang-ups and back-pressure ---------------------------------------------------


@pytest.fixture(scope="module")
def slow_api(tiny_pair_dirs, tiny_strong, tiny_weak, tmp_path_factory) -> Iterator[str]:
    """Frames every 0.25 s (16 tokens/s a stream) and 2 POSTs in flight at most."""
    config = api_config(
        tiny_pair_dirs,
        tmp_path_factory.mktemp("slow"),
        outer={"max_requests": 2},
        link={"tick_s": 0.25},
    )
    with served_api(config, tiny_strong, tiny_weak) as url:
        yield url


def open_streams(http: httpx.Client) -> int:
    return len(http.get("/status.json").json()["streams"])


def wait_for(what: str, condition, timeout_s: float) -> float:
    """Seconds until `condition()` held (fails after `timeout_s`)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"no {what} after {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - start


def long_request(url: str, *, stream: bool) -> socket.socket:
    """A request for 200 tokens (12 s at this pace), sent on a connection left open."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    body = json.dumps(
        {
            "model": "tiny",
            "prompt": "def f(x):",
            "max_tokens": 200,
            "temperature": 1.0,
            "stream": stream,
        }
    ).encode()
    s.sendall(post("/v1/completions", body).replace(b"connection: close", b"x: y"))
    return s


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_client_that_hangs_up_cancels_its_stream(slow_api, stream):
    with httpx.Client(base_url=slow_api, timeout=10) as http:
        s = long_request(slow_api, stream=stream)
        wait_for("open stream", lambda: open_streams(http) == 1, 10)
        if stream:
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.close()
        # The stream leaves the table at the inner's next frame, not 12 s later.
        took = wait_for("cancelled stream", lambda: open_streams(http) == 0, 3)
        assert took < 3


def test_too_many_requests_is_a_429_with_retry_after(slow_api):
    with httpx.Client(base_url=slow_api, headers=AUTH, timeout=10) as http:
        held = [long_request(slow_api, stream=False) for _ in range(2)]
        try:
            wait_for("two open streams", lambda: open_streams(http) == 2, 10)
            r = http.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert openai_shaped(r)["code"] == "rate_limit_exceeded"
            assert http.get("/health").status_code == 200  # monitoring still answers
        finally:
            for s in held:
                s.close()
        wait_for("free slots", lambda: open_streams(http) == 0, 5)
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200


def test_tokenisation_runs_off_the_event_loop(tiny_pair_dirs, tiny_strong, tmp_path):
    """#16 item 5: a long prompt's tokenisation must not stall the loop that reads the uplink
    (and answers everyone else): it runs on the API's own thread."""
    from uplimit.models.hf import HFModel

    class Recording(HFModel):
        threads: ClassVar[list[str]] = []

        def tokenize(self, text: str, *, special: bool = False) -> list[int]:
            self.threads.append(threading.current_thread().name)
            return super().tokenize(text, special=special)

    weak = Recording(tiny_pair_dirs[1])
    config = api_config(tiny_pair_dirs, tmp_path)
    try:
        with served_api(config, tiny_strong, weak) as url, httpx.Client(base_url=url) as http:
            Recording.threads.clear()
            for path, body in (
                ("/v1/chat/completions", {"messages": CHAT}),
                ("/v1/completions", {"prompt": "x"}),
            ):
                r = http.post(path, json={"model": "tiny", "max_tokens": 2, **body}, timeout=30)
                assert r.status_code == 200, r.text
    finally:
        weak.close()
    assert len(Recording.threads) == 2
    assert all(name.startswith("uplimit-tokenize") for name in Recording.threads)


# --- API keys with limits (#16 item 4) --------------------------------------------------------


def test_keys_with_limits(tiny_pair_dirs, tiny_strong, tiny_weak, tmp_path):
    """Each key of the keys file opens the API within its own limits (a 429 past one, in
    OpenAI's shape, with Retry-After); a revoked key is a 401; usage per key is in the
    metrics."""
    from support.net import free_port
    from uplimit.outer.keys import KeyLimits, add_key, revoke_key

    path = tmp_path / "keys.json"
    minute = add_key(path, "minute", KeyLimits(per_minute=2))
    one = add_key(path, "one-stream", KeyLimits(streams=1))
    bits = add_key(path, "bits", KeyLimits(bits_per_day=1))
    gone = add_key(path, "gone", KeyLimits())
    revoke_key(path, "gone")
    metrics_port = free_port()
    config = api_config(
        tiny_pair_dirs, tmp_path, outer={"keys_file": path, "metrics_port": metrics_port}
    )

    def ask(http: httpx.Client, key: str, **fields: object) -> httpx.Response:
        body = {"model": "tiny", "messages": CHAT, "max_tokens": 2, **fields}
        return http.post(
            "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
        )

    with (
        served_api(config, tiny_strong, tiny_weak) as url,
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        assert [ask(http, minute).status_code for _ in range(3)] == [200, 200, 429]
        r = ask(http, minute)
        assert r.headers["retry-after"] == "60"
        assert openai_shaped(r)["code"] == "rate_limit_exceeded"
        assert ask(http, one, n=2).status_code == 429  # two streams at once
        assert ask(http, one).status_code == 200
        assert ask(http, bits).status_code == 200  # uploads its answer: over its day's bits
        r = ask(http, bits)
        assert r.status_code == 429 and int(r.headers["retry-after"]) <= 86_400
        assert ask(http, gone).status_code == 401
        assert ask(http, "upl-" + "x" * 43).status_code == 401
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    assert 'uplimit_api_requests_total{key="minute",outcome="admitted"} 2.0' in metrics
    assert 'uplimit_api_requests_total{key="minute",outcome="over_per_minute"} 2.0' in metrics
    assert 'uplimit_api_uploaded_bits_total{key="bits"}' in metrics


def test_a_stream_cut_by_the_link_ends_with_a_fixed_text(
    tiny_pair_dirs, tiny_strong, tiny_weak, tmp_path
):
    """#15 item 5: the inner stops mid-stream; the stream's last event is the fixed text of the
    link's state, as in a 503, whatever the link's reason says."""
    config = api_config(tiny_pair_dirs, tmp_path, link={"tick_s": 0.25})
    stop: list = []
    body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 200, "stream": True}
    with (
        served_api(config, tiny_strong, tiny_weak, stop_inner=stop) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert '"text"' in first
            stop[0]()
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        state = LinkState(http.get("/health").json()["link"])
    assert state is not LinkState.SERVING
    assert events[-1] == link_error(state).body()


def test_a_stream_the_inner_refuses_is_a_4xx_and_the_link_serves_on(
    tiny_pair_dirs, tiny_strong, tiny_weak, tmp_path
):
    """#16 item 2: the inner's context is shorter than the outer's, so a long prompt passes
    the gateway and the inner refuses that stream alone: 400 `context_length_exceeded` (an
    error event when streaming), while the requests around it are served."""
    config = api_config(tiny_pair_dirs, tmp_path)  # max_context 256
    inner_config = inner_beside(config, tiny_pair_dirs, tmp_path, coding={"max_context": 64})
    long_prompt = "word " * 100
    short = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 8}
    with (
        served_api(config, tiny_strong, tiny_weak, inner_config=inner_config) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):

        def refused_and_served() -> list[httpx.Response]:
            pool = [
                threading.Thread(
                    target=lambda b=b: out.append(http.post("/v1/completions", json=b))
                )
                for b in (short, {**short, "prompt": long_prompt}, short)
            ]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            return out

        out: list[httpx.Response] = []
        statuses = sorted(r.status_code for r in refused_and_served())
        assert statuses == [200, 200, 400], [r.text for r in out]
        (refused,) = [r for r in out if r.status_code == 400]
        assert openai_shaped(refused)["code"] == "context_length_exceeded"
        body = {**short, "prompt": long_prompt, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "context_length_exceeded"
        assert http.get("/health").json()["link"] == "serving"
        ok = http.post("/v1/completions", json=short)
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"]
