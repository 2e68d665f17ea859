"""Request fields beyond the basics and hostile input, against a live `sglgym serve`."""

from __future__ import annotations

import time

import httpx

USER = [{"role": "user", "content": "What is 12 + 7?"}]


def post(engine, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    with engine.client(timeout=timeout) as c:
        return c.post(path, json={"model": "sglgym-tiny", **body})


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def first_turn(engine) -> dict:
    return ok(post(engine, "/v1/chat/completions", {"messages": USER, "max_tokens": 6}))["choices"][0]["message"]


def test_oversize_body_is_a_413_at_once(engine):
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * (40 << 20) + b'"}]}'
    t0 = time.monotonic()
    with engine.client(timeout=60) as c:
        r = c.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["param"] == "body"
        assert c.get("/health").status_code == 200
    assert time.monotonic() - t0 < 30


def test_long_text_under_the_body_limit_is_refused_before_tokenizing(engine):
    t0 = time.monotonic()
    r = post(engine, "/v1/chat/completions", {"messages": [{"role": "user", "content": "7 + 8 " * (3 << 20)}]})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 10   # 18 MB of text: a tokenizer pass alone takes longer here


def test_logit_bias_and_min_tokens_change_generation(engine, tokenizer):
    eos = tokenizer.eos_token_id
    forced = ok(post(engine, "/v1/chat/completions", {"messages": USER, "max_tokens": 6, "logit_bias": {"42": 100}}))
    assert forced["choices"][0]["message"]["generation_token_ids"] == [42] * 6
    stop_now = {"messages": USER, "max_tokens": 12, "logit_bias": {str(eos): 100}}
    assert ok(post(engine, "/v1/chat/completions", stop_now))["choices"][0]["message"]["generation_token_ids"] == [eos]
    held = ok(post(engine, "/v1/chat/completions", {**stop_now, "min_tokens": 5}))["choices"][0]["message"]
    assert len(held["generation_token_ids"]) == 6 and held["generation_token_ids"][-1] == eos


def test_top_logprobs_zero_with_logprobs(engine):
    body = {"messages": USER, "max_tokens": 4, "logprobs": True, "top_logprobs": 0, "return_tokens_as_token_ids": True}
    choice = ok(post(engine, "/v1/chat/completions", body))["choices"][0]
    entries = choice["logprobs"]["content"]
    assert [int(e["token"].split(":")[1]) for e in entries] == choice["message"]["generation_token_ids"]
    assert all(e["top_logprobs"] == [] for e in entries)


def test_carried_bundle_with_routed_experts_and_empty_bundle(engine):
    m = first_turn(engine)
    carried = {"role": "assistant", "content": m["content"] or "", "routed_experts": "opaque-base64==",
               **{k: m[k] for k in ("prompt_token_ids", "generation_token_ids", "generation_log_probs")}}
    msgs = [*USER, carried, {"role": "user", "content": "more"}]
    nxt = ok(post(engine, "/v1/chat/completions", {"messages": msgs, "max_tokens": 2}))["choices"][0]["message"]
    prefix = m["prompt_token_ids"] + m["generation_token_ids"]
    assert nxt["prompt_token_ids"][:len(prefix)] == prefix
    empty = {**carried, "prompt_token_ids": [], "generation_token_ids": [], "generation_log_probs": []}
    del empty["routed_experts"]
    plain = ok(post(engine, "/tokenize", {"messages": [*USER, empty, {"role": "user", "content": "more"}]}))
    templated = ok(post(engine, "/tokenize", {"messages": [*USER, {"role": "assistant", "content": m["content"] or ""},
                                                           {"role": "user", "content": "more"}]}))
    assert plain["tokens"] == templated["tokens"]


def test_required_prefix_token_ids_on_tokenize_and_chat(engine):
    """NeMo Gym >= 0.5 forwards `required_prefix_token_ids` (and `mm_processor_kwargs`) to /tokenize."""
    m = first_turn(engine)
    prefix = m["prompt_token_ids"] + m["generation_token_ids"]
    msgs = [*USER, {"role": "assistant", "content": m["content"] or ""}, {"role": "user", "content": "more"}]
    body = {"messages": msgs, "required_prefix_token_ids": prefix, "mm_processor_kwargs": {}}
    tokens = ok(post(engine, "/tokenize", body))["tokens"]
    assert tokens[:len(prefix)] == prefix and len(tokens) > len(prefix)
    chat = ok(post(engine, "/v1/chat/completions", {**body, "max_tokens": 2}))["choices"][0]["message"]
    assert chat["prompt_token_ids"] == tokens
    bad = post(engine, "/tokenize", {**body, "required_prefix_token_ids": [*prefix[:3], 5, *prefix[4:]],
                                     "messages": [*msgs[:1], {**msgs[1], **{k: m[k] for k in (
                                         "prompt_token_ids", "generation_token_ids", "generation_log_probs")}},
                                                  msgs[2]]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "required_prefix_token_ids"


def test_response_format_json_schema_constrains_the_output(engine):
    import json
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    body = {"messages": USER, "max_tokens": 40, "n": 3, "temperature": 1.0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}
    choices = ok(post(engine, "/v1/chat/completions", body))["choices"]
    finished = [c for c in choices if c["finish_reason"] == "stop"]
    assert finished, [c["message"]["content"] for c in choices]
    for c in finished:
        assert json.loads(c["message"]["content"])["answer"] in ("yes", "no")
    free = ok(post(engine, "/v1/chat/completions", {**body, "response_format": None}))["choices"]
    assert not any(_is_json(c["message"]["content"]) for c in free)   # the random model alone never writes it


def _is_json(text: str | None) -> bool:
    import json
    try:
        return isinstance(json.loads(text or ""), dict)
    except ValueError:
        return False


def test_body_limit_is_a_serve_flag():
    from sglgym.engine.launch import parse_own_args
    own, rest = parse_own_args(["--max-request-mb", "0.5", "--port", "1"])
    assert own.max_request_mb == 0.5 and rest == ["--port", "1"]
    assert parse_own_args([])[0].max_request_mb == 32.0
