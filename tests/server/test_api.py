"""Chat and text completions, streamed and not, in OpenAI's shapes; models, health,
metrics; error bodies. Runs against the main server started by run.sh."""

import json
import urllib.request

import openai
import pytest

from conftest import MODEL_NAME, URL, client, http, metrics

USAGE_KEYS = {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details",
              "prompt_cache_hit_tokens", "prompt_cache_miss_tokens"}
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Tell me about the sea."}]


def check_usage(usage):
    u = usage if isinstance(usage, dict) else usage.model_dump()
    assert USAGE_KEYS <= set(u), u
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    cached = u["prompt_tokens_details"]["cached_tokens"]
    assert u["prompt_cache_hit_tokens"] == cached
    assert u["prompt_cache_miss_tokens"] == u["prompt_tokens"] - cached
    return u


def test_health_and_models():
    status, _, body = http("GET", URL + "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    ids = [m.id for m in client().models.list().data]
    assert "deepseek-chat" in ids and MODEL_NAME in ids
    status, _, body = http("GET", URL + "/models")  # DeepSeek's path
    assert status == 200 and json.loads(body)["object"] == "list"


def test_chat_non_streaming_shape():
    c = client()
    r = c.chat.completions.create(model="deepseek-chat", messages=MESSAGES, max_tokens=10,
                                  temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.model == "deepseek-chat" and isinstance(r.created, int)
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    u = check_usage(r.usage)
    assert u["completion_tokens"] <= 10
    # The served model's own name works too.
    r2 = c.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10,
                                   temperature=0)
    assert r2.choices[0].message.content == choice.message.content


def test_chat_streaming_matches_non_streaming():
    c = client()
    full = c.chat.completions.create(model="deepseek-chat", messages=MESSAGES, max_tokens=16,
                                     temperature=0)
    chunks = list(c.chat.completions.create(
        model="deepseek-chat", messages=MESSAGES, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert len({ch.id for ch in chunks}) == 1
    finish = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(ch.usage is None for ch in chunks[:-1])
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    u = check_usage(chunks[-1].usage)
    assert u["completion_tokens"] == full.usage.completion_tokens


def test_raw_sse_format():
    body = {"model": "deepseek-chat", "messages": MESSAGES, "max_tokens": 4, "temperature": 0,
            "stream": True}
    req = urllib.request.Request(URL + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "usage" not in first  # only with stream_options.include_usage


def test_completions_text_and_token_prompts():
    c = client()
    r = c.completions.create(model="deepseek-chat", prompt="the sea is", max_tokens=8,
                             temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert isinstance(r.choices[0].text, str) and r.choices[0].finish_reason == "length"
    check_usage(r.usage)
    ids = [5, 17, 42, 99, 150, 7]
    r = c.completions.create(model="deepseek-chat", prompt=ids, max_tokens=8, temperature=0,
                             extra_body={"return_token_ids": True, "ignore_eos": True})
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 8
    assert len(r.choices[0].model_extra["token_ids"]) == 8
    # A batch of prompts with n=2: choices 0..3, prompt tokens counted once per prompt.
    r = c.completions.create(model="deepseek-chat", prompt=[ids, ids[:3]], n=2, max_tokens=3,
                             temperature=0, extra_body={"ignore_eos": True})
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == len(ids) + 3 and r.usage.completion_tokens == 12
    assert r.choices[0].text == r.choices[1].text  # greedy


def test_completions_streaming_matches_non_streaming():
    c = client()
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    full = c.completions.create(model="deepseek-chat", prompt=ids, max_tokens=12, temperature=0,
                                extra_body={"return_token_ids": True})
    chunks = list(c.completions.create(model="deepseek-chat", prompt=ids, max_tokens=12,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"return_token_ids": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    streamed_ids = [t for ch in chunks if ch.choices
                    for t in (ch.choices[0].model_extra.get("token_ids") or [])]
    assert text == full.choices[0].text
    assert streamed_ids == full.choices[0].model_extra["token_ids"]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_deepseek_paths_without_v1():
    c = openai.OpenAI(base_url=URL, api_key="unused", max_retries=0, timeout=60)
    r = c.chat.completions.create(model="deepseek-chat", messages=MESSAGES, max_tokens=3,
                                  temperature=0)
    assert r.choices[0].message.role == "assistant"
    r = c.completions.create(model="deepseek-chat", prompt=[1, 2, 3], max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1


def test_logprobs():
    c = client()
    r = c.chat.completions.create(model="deepseek-chat", messages=MESSAGES, max_tokens=5,
                                  temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy picks the top one
    r = c.completions.create(model="deepseek-chat", prompt=[1, 2, 3], max_tokens=4,
                             temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) >= 1 for t in lp.top_logprobs)


def test_stop_strings_end_generation_and_are_not_emitted():
    c = client()
    ids = [11, 22, 33, 44, 55]
    base = c.completions.create(model="deepseek-chat", prompt=ids, max_tokens=40, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    # A stop string from the middle of the greedy text (printable ASCII only).
    stop = next((base[i:i + 2] for i in range(2, len(base) - 2)
                 if base[i:i + 2].isascii() and base[i:i + 2].isprintable()), None)
    if stop is None:
        pytest.skip("the greedy text has no printable ASCII pair")
    r = c.completions.create(model="deepseek-chat", prompt=ids, max_tokens=40, temperature=0,
                             stop=[stop, "\u2603never"], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[:base.index(stop)]
    chunks = list(c.completions.create(model="deepseek-chat", prompt=ids, max_tokens=40,
                                       temperature=0, stop=stop, stream=True,
                                       extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == base[:base.index(stop)]


def test_max_tokens_and_max_completion_tokens():
    c = client()
    for kw in ({"max_tokens": 7}, {"max_completion_tokens": 7}):
        r = c.chat.completions.create(model="deepseek-chat", messages=MESSAGES, temperature=0,
                                      extra_body={"ignore_eos": True}, **kw)
        assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible():
    c = client()
    kw = dict(model="deepseek-chat", prompt=[7, 8, 9], max_tokens=20, temperature=1.0,
              top_p=0.9, seed=1234, extra_body={"return_token_ids": True, "ignore_eos": True})
    a = c.completions.create(**kw).choices[0].model_extra["token_ids"]
    b = c.completions.create(**kw).choices[0].model_extra["token_ids"]
    assert a == b
    two = c.completions.create(n=2, **kw).choices
    assert two[0].model_extra["token_ids"] == a  # choice i uses seed + i


def test_prefix_cache_hits_show_in_usage_and_metrics():
    c = client()
    before, _ = metrics()
    prompt = [(i * 37 + 11) % 290 for i in range(100)]
    first = c.completions.create(model="deepseek-chat", prompt=prompt, max_tokens=2,
                                 temperature=0)
    second = c.completions.create(model="deepseek-chat", prompt=prompt, max_tokens=2,
                                  temperature=0)
    u1, u2 = check_usage(first.usage), check_usage(second.usage)
    assert u1["prompt_cache_hit_tokens"] == 0
    # 100 tokens = 6 full blocks of 16 (the last 4 tokens are always computed).
    assert u2["prompt_cache_hit_tokens"] == 96
    assert first.choices[0].text == second.choices[0].text
    after, _ = metrics()
    assert after["dsv2:prefix_cache_hits_total"] - before["dsv2:prefix_cache_hits_total"] >= 96


def error_of(status, body):
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


@pytest.mark.parametrize("field,value", [
    ("temperature", 3), ("temperature", "hot"), ("top_p", 1.5), ("max_tokens", 0),
    ("max_tokens", -4), ("n", 0), ("presence_penalty", 9), ("frequency_penalty", -3),
    ("min_p", 2), ("top_k", -5), ("stop", [str(i) for i in range(17)]), ("stop", 5),
    ("seed", "x"), ("stream", "yes"), ("logprobs", "x"),
])
def test_out_of_range_values_get_400_naming_the_field(field, value):
    body = {"model": "deepseek-chat", "messages": MESSAGES, field: value}
    status, _, raw = http("POST", URL + "/v1/chat/completions", body)
    assert status == 400
    err = error_of(status, raw)
    assert err["type"] == "invalid_request_error" and err["param"] == field, err


def test_error_bodies_through_the_client():
    c = client()
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="deepseek-chat", messages=MESSAGES, top_logprobs=30,
                                  logprobs=True)
    assert e.value.status_code == 400 and e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="deepseek-chat", prompt=[1, 2, 100000], max_tokens=2)
    assert "vocabulary" in e.value.body["message"]


def test_malformed_json_and_missing_fields():
    status, _, raw = http("POST", URL + "/v1/chat/completions", b"{not json")
    assert status == 400 and "JSON" in error_of(status, raw)["message"]
    status, _, raw = http("POST", URL + "/v1/chat/completions", {"model": "deepseek-chat"})
    assert status == 400 and error_of(status, raw)["param"] == "messages"
    status, _, raw = http("POST", URL + "/v1/completions", {"model": "deepseek-chat"})
    assert status == 400 and error_of(status, raw)["param"] == "prompt"
    status, _, raw = http("GET", URL + "/v1/nothing-here")
    assert status == 404 and error_of(status, raw)["type"] == "invalid_request_error"


def test_over_long_prompt_gets_400_naming_the_limit():
    c = client()
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="deepseek-chat", prompt=[5] * 6000, max_tokens=2)
    assert "5120" in e.value.body["message"] and "6000" in e.value.body["message"]
    assert e.value.body["code"] == "context_length_exceeded"
    assert e.value.body["param"] == "prompt"


def test_metrics_exposition():
    client().completions.create(model="deepseek-chat", prompt=[1, 2], max_tokens=3,
                                temperature=0)
    values, text = metrics()
    for name in ["dsv2:num_requests_running", "dsv2:num_requests_waiting",
                 "dsv2:kv_cache_usage_perc", "dsv2:kv_cache_blocks_used",
                 "dsv2:kv_cache_blocks_total", "dsv2:prefix_cache_queries_total",
                 "dsv2:prefix_cache_hits_total", "dsv2:prefix_cache_hit_rate",
                 "dsv2:prompt_tokens_total", "dsv2:generation_tokens_total",
                 "dsv2:time_to_first_token_seconds_count",
                 "dsv2:inter_token_latency_seconds_count",
                 "dsv2:e2e_request_latency_seconds_count"]:
        assert name in values, name
    assert 'dsv2:request_success_total{finished_reason="length"}' in values
    assert 'dsv2:time_to_first_token_seconds_bucket{le="+Inf"}' in values
    assert "# TYPE dsv2:e2e_request_latency_seconds histogram" in text
    assert values["dsv2:kv_cache_blocks_total"] > 0
    assert values["dsv2:generation_tokens_total"] >= 3
