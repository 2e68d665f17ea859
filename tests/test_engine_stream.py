"""Streaming on the token route, with the official OpenAI SDK, against a live `sglgym serve`."""

from __future__ import annotations

import httpx
import openai
import pytest

USER = [{"role": "user", "content": "What is 12 + 7?"}]
IDS = {"return_tokens_as_token_ids": True}


@pytest.fixture(scope="module")
def client(engine):
    return openai.OpenAI(base_url=f"{engine.base_url}/v1", api_key=engine.api_key, timeout=120, max_retries=0)


def collect(stream) -> tuple[dict, object]:
    """Per choice: content, token ids from the logprob entries, finish reason and the closing bundle."""
    out: dict[int, dict] = {}
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            o = out.setdefault(c.index, {"content": "", "ids": [], "lps": [], "finish": None, "bundle": None,
                                         "roles": []})
            o["content"] += c.delta.content or ""
            if c.delta.role:
                o["roles"].append(c.delta.role)
            if c.logprobs and c.logprobs.content:
                o["ids"] += [int(e.token.removeprefix("token_id:")) for e in c.logprobs.content]
                o["lps"] += [e.logprob for e in c.logprobs.content]
            if c.finish_reason:
                o["finish"], o["bundle"] = c.finish_reason, c.delta.model_extra
                o["versions"] = {k: (c.model_extra or {}).get(k) for k in ("weight_version", "weight_versions")}
    return out, usage


def test_stream_equals_the_non_streaming_reply(client):
    kw = dict(model="sglgym-tiny", messages=USER, max_tokens=16, temperature=0, logprobs=True, extra_body=IDS)
    whole = client.chat.completions.create(**kw).choices[0]
    streamed, _ = collect(client.chat.completions.create(stream=True, **kw))
    s = streamed[0]
    gen = whole.message.model_extra["generation_token_ids"]
    assert s["roles"] == ["assistant"]
    assert s["content"] == whole.message.content
    assert s["ids"] == gen and len(gen) == 16
    assert s["lps"] == pytest.approx(whole.message.model_extra["generation_log_probs"], abs=1e-5)
    assert s["finish"] == whole.finish_reason == "length"
    # the closing chunk carries the bundle a trainer needs, as the non-streaming message does
    assert s["bundle"]["generation_token_ids"] == gen
    assert s["bundle"]["prompt_token_ids"] == whole.message.model_extra["prompt_token_ids"]
    assert s["bundle"]["generation_log_probs"] == pytest.approx(s["lps"], abs=1e-6)
    # and which weights sampled which tokens (async GRPO reads it)
    versions = {k: whole.model_extra[k] for k in ("weight_version", "weight_versions")}
    assert s["versions"] == versions and versions["weight_versions"][-1]["end"] == 16


def test_stream_n_choices_and_usage(client):
    stream = client.chat.completions.create(model="sglgym-tiny", messages=USER, max_tokens=10, n=3,
                                            temperature=1.0, logprobs=True, extra_body=IDS, stream=True,
                                            stream_options={"include_usage": True})
    out, usage = collect(stream)
    assert sorted(out) == [0, 1, 2]
    for o in out.values():
        assert o["ids"] == o["bundle"]["generation_token_ids"] and 1 <= len(o["ids"]) <= 10
        assert o["finish"] in ("stop", "length")
    assert usage.completion_tokens == sum(len(o["ids"]) for o in out.values())
    assert usage.prompt_tokens == len(out[0]["bundle"]["prompt_token_ids"])


def test_streamed_bundle_continues_a_multi_turn_chat(client):
    """A streaming client can send the closing bundle back, and the next prompt starts with it."""
    out, _ = collect(client.chat.completions.create(model="sglgym-tiny", messages=USER, max_tokens=8,
                                                    temperature=1.0, stream=True))
    first = out[0]
    carried = {"role": "assistant", "content": first["content"], **{
        k: first["bundle"][k] for k in ("prompt_token_ids", "generation_token_ids", "generation_log_probs")}}
    nxt = client.chat.completions.create(model="sglgym-tiny", max_tokens=4,
                                         messages=[*USER, carried, {"role": "user", "content": "And 3 + 4?"}])
    prefix = first["bundle"]["prompt_token_ids"] + first["bundle"]["generation_token_ids"]
    prompt = nxt.choices[0].message.model_extra["prompt_token_ids"]
    assert prompt[:len(prefix)] == prefix and len(prompt) > len(prefix)


def test_stream_bad_input_is_a_400_before_streaming(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="sglgym-tiny", messages=USER, max_tokens=10**7, stream=True)
    assert e.value.body["param"] == "max_tokens"


def test_stream_is_server_sent_events(engine):
    with httpx.Client(base_url=engine.base_url, headers=engine.headers, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json={"messages": USER, "max_tokens": 4,
                                                            "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_sse_events_survive_splitlines_readers():
    """U+0085, U+2028 and U+2029 are raw in JSON but line ends to str.splitlines (httpx's iter_lines):
    a random model writes them, and an event must stay one line."""
    import orjson

    from sglgym.engine.streaming import sse
    text = "a\x85b\u2028c\u2029d\ne"
    event = sse({"delta": {"content": text}}).decode()
    lines = [line for line in event.splitlines() if line]
    assert len(lines) == 1 and orjson.loads(lines[0][len("data: "):])["delta"]["content"] == text
