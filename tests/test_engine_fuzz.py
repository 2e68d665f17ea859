"""No input makes the route answer 5xx: seeded random mutations of valid requests, against a live server."""

from __future__ import annotations

import random

import pytest

USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 7?"}]
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}]
WEIRD = [None, True, -1, 0, 2**63, -(2**63) - 1, 1e308, -0.0, "", "x" * 5000, "\u0000", "\U0001F600", [], [[]], {},
         {"a": {"b": [1, {"c": None}]}}, [1, "a", None], "token_id:5", 3.5, "nan"]
FIELDS = ["model", "messages", "tools", "tool_choice", "temperature", "top_p", "top_k", "min_p", "max_tokens",
          "max_completion_tokens", "n", "stop", "stop_token_ids", "seed", "logprobs", "top_logprobs",
          "return_tokens_as_token_ids", "skip_special_tokens", "frequency_penalty", "presence_penalty",
          "repetition_penalty", "ignore_eos", "stream", "stream_options", "chat_template_kwargs", "min_tokens",
          "logit_bias", "response_format", "parallel_tool_calls", "required_prefix_token_ids", "user"]


def mutate(rng: random.Random, carried: dict) -> dict:
    body = {"model": "sglgym-tiny", "messages": [dict(m) for m in USER], "max_tokens": 3}
    if rng.random() < 0.3:
        body["messages"] += [dict(carried), {"role": "user", "content": "and 1 + 1?"}]
    if rng.random() < 0.3:
        body["tools"] = TOOLS
    for _ in range(rng.randint(1, 3)):
        where = rng.random()
        messages = body["messages"] if isinstance(body["messages"], list) and body["messages"] else None
        if where < 0.5 or messages is None or not all(isinstance(m, dict) for m in messages):
            body[rng.choice(FIELDS)] = rng.choice(WEIRD)
        else:   # inside a message
            m = rng.choice(messages)
            m[rng.choice(["role", "content", "tool_calls", "prompt_token_ids", "generation_token_ids",
                          "generation_log_probs", "reasoning_content", "name", "tool_call_id"])] = rng.choice(WEIRD)
    if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool) \
            and body["max_tokens"] > 8:
        body["max_tokens"] = 8   # keep generation short: the point is the status code
    if body.get("n") not in (None, 1) and not isinstance(body.get("n"), (str, list, dict, float)):
        body["n"] = 2
    return body


@pytest.mark.parametrize("seed", range(4))
def test_random_mutations_never_answer_5xx(engine, seed):
    rng = random.Random(seed)
    with engine.client(timeout=60) as c:
        first = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4}).json()
        m = first["choices"][0]["message"]
        carried = {"role": "assistant", "content": m["content"] or "", **{
            k: m[k] for k in ("prompt_token_ids", "generation_token_ids", "generation_log_probs")}}
        statuses = {}
        for i in range(40):
            body = mutate(rng, carried)
            for path in ("/v1/chat/completions", "/tokenize"):
                r = c.post(path, json=body)
                assert r.status_code < 500, (path, body, r.text[:500])
                if r.status_code >= 400:
                    assert r.json()["error"]["message"], r.text
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert c.get("/health").status_code == 200
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0, statuses   # both kinds were exercised
