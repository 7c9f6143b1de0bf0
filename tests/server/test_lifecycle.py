"""Auth, request timeouts and SIGTERM drain, each on a server of its own."""

import json
import threading

import openai
import pytest

from conftest import client, http, wait_for
from test_load import LONG, LONG_KW, idle, raw_stream

KEY = "sk-test-0123456789abcdef"


def check_auth(url):
    with pytest.raises(openai.AuthenticationError) as e:
        client(url, api_key="sk-wrong").models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    status, headers, body = http("POST", url + "/v1/chat/completions",
                                 {"model": "deepseek-chat", "messages": []})
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    status, _, _ = http("GET", url + "/models")  # the paths without /v1 too
    assert status == 401
    r = client(url, api_key=KEY).completions.create(model="deepseek-chat", prompt=[1, 2],
                                                     max_tokens=2)
    assert r.usage.completion_tokens >= 1
    # /health and /metrics stay open.
    assert http("GET", url + "/health")[0] == 200
    assert http("GET", url + "/metrics")[0] == 200


def test_api_key_flag(start_server):
    check_auth(start_server("--api-key", KEY).url)


def test_api_key_from_environment(start_server):
    check_auth(start_server(env={"DSV2_API_KEY": KEY}).url)


def test_request_timeout(start_server):
    # Well below LONG's running time (0.7-1.4 s), well above its first tokens' (~ms).
    s = start_server("--request-timeout", "0.1")
    with pytest.raises(openai.APIStatusError) as e:
        client(s.url).completions.create(**LONG_KW)
    assert e.value.status_code == 504 and e.value.body["type"] == "timeout_error"
    # Streamed: an error event, then [DONE].
    events = []
    with pytest.raises(openai.APIError):
        for chunk in client(s.url).completions.create(stream=True, **LONG_KW):
            events.append(chunk)
    assert events, "some tokens should arrive before the timeout"
    wait_for(lambda: idle(s.url), 10, what="timed-out requests to be freed")


def read_rest(conn_resp):
    """Reads SSE lines until [DONE] (bounded by the socket timeout)."""
    lines = []
    while True:
        line = conn_resp.readline()
        if not line:
            return lines
        line = line.strip()
        if line:
            lines.append(line.decode())
        if line == b"data: [DONE]":
            return lines


def test_sigterm_drains_running_requests_then_exits(start_server):
    s = start_server("--drain-timeout", "60")
    # All of LONG: the health and the refused request below must come while
    # it still runs (1,500 tokens, ~0.3 s, left a thin margin on a loaded machine).
    body = {**LONG, "stream": True}
    _, resp = raw_stream(s.url, body)
    s.terminate()
    # Draining: health 503, new requests 503, the running stream goes on.
    wait_for(lambda: http("GET", s.url + "/health")[0] == 503, 5, what="health 503")
    status, headers, raw = http("POST", s.url + "/v1/completions",
                                {"model": "deepseek-chat", "prompt": [1], "max_tokens": 1})
    assert status == 503 and "retry-after" in {k.lower() for k in headers}
    lines = read_rest(resp)
    assert lines[-1] == "data: [DONE]"
    finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines[:-1]]
    assert finish[-1] == "length"
    assert s.proc.wait(timeout=30) == 0


def test_drain_deadline_aborts_what_is_left(start_server):
    # Far below LONG's running time, so the request is still running at the deadline even
    # on a machine several times faster than this one.
    s = start_server("--drain-timeout", "0.1")
    _, resp = raw_stream(s.url, {**LONG, "stream": True})
    s.terminate()
    lines = read_rest(resp)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "abort"
    assert s.proc.wait(timeout=30) == 0
