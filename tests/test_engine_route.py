"""The token-in/token-out chat route, against a live `sglgym serve` (real SGLang on CPU)."""

from __future__ import annotations

import httpx
import pytest
import torch

USER = [{"role": "user", "content": "What is 12 + 7?"}]


def chat(engine, body: dict, **kw) -> dict:
    with engine.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "sglgym-tiny", **body}, **kw)
    assert r.status_code == 200, r.text
    return r.json()


def carried_assistant(choice: dict) -> dict:
    """The assistant message a client sends back next turn: content plus the carried ids."""
    m = choice["message"]
    return {"role": "assistant", "content": m["content"] or "", "tool_calls": m["tool_calls"],
            **{k: m[k] for k in ("prompt_token_ids", "generation_token_ids", "generation_log_probs")}}


@pytest.fixture(scope="module")
def hf_model(tiny_model_path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_model_path, torch_dtype=torch.float32).eval()


def hf_token_logprobs(model, prompt_ids: list[int], gen_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + gen_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(gen_ids) - 1)
    return logp[positions, torch.tensor(gen_ids)]


def test_response_carries_ids_and_logprobs_matching_transformers(engine, hf_model):
    body = {"messages": USER, "max_tokens": 24, "temperature": 1.0, "seed": 3, "n": 3,
            "logprobs": True, "return_tokens_as_token_ids": True}
    out = chat(engine, body)
    assert len(out["choices"]) == 3
    for choice in out["choices"]:
        m = choice["message"]
        gen, lps = m["generation_token_ids"], m["generation_log_probs"]
        assert 1 <= len(gen) <= 24 and len(lps) == len(gen)
        content = choice["logprobs"]["content"]
        assert [c["token"] for c in content] == [f"token_id:{t}" for t in gen]
        assert [c["logprob"] for c in content] == lps
        ref = hf_token_logprobs(hf_model, m["prompt_token_ids"], gen)
        assert torch.allclose(torch.tensor(lps, dtype=torch.float64), ref, atol=1e-4), \
            (torch.tensor(lps) - ref).abs().max()
    assert out["usage"]["completion_tokens"] == sum(len(c["message"]["generation_token_ids"]) for c in out["choices"])
    assert out["usage"]["prompt_tokens"] == len(out["choices"][0]["message"]["prompt_token_ids"])


def test_prompt_ids_equal_transformers_chat_template(engine, tokenizer):
    out = chat(engine, {"messages": USER, "max_tokens": 2})
    expected = tokenizer.apply_chat_template(USER, add_generation_prompt=True, tokenize=False)
    assert out["choices"][0]["message"]["prompt_token_ids"] == tokenizer.encode(expected, add_special_tokens=False)


def test_temperature_zero_is_deterministic(engine):
    body = {"messages": USER, "max_tokens": 16, "temperature": 0.0}
    a = chat(engine, body)["choices"][0]["message"]
    b = chat(engine, body)["choices"][0]["message"]
    assert a["generation_token_ids"] == b["generation_token_ids"]
    assert a["generation_log_probs"] == pytest.approx(b["generation_log_probs"], abs=1e-6)


def test_stop_token_is_the_last_generated_id(engine):
    greedy = chat(engine, {"messages": USER, "max_tokens": 12, "temperature": 0.0})["choices"][0]
    ids = greedy["message"]["generation_token_ids"]
    stop_id = ids[3]
    out = chat(engine, {"messages": USER, "max_tokens": 12, "temperature": 0.0, "stop_token_ids": [stop_id]})
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop"
    gen = choice["message"]["generation_token_ids"]
    assert gen == ids[: ids.index(stop_id) + 1]  # the stop token itself is kept, like a final EOS
    assert len(choice["message"]["generation_log_probs"]) == len(gen)
    capped = chat(engine, {"messages": USER, "max_tokens": 2, "temperature": 0.0})["choices"][0]
    assert capped["finish_reason"] == "length" and len(capped["message"]["generation_token_ids"]) == 2


def test_ignore_eos_generates_max_tokens(engine):
    out = chat(engine, {"messages": USER, "max_tokens": 24, "n": 4, "seed": 3, "ignore_eos": True})
    for choice in out["choices"]:
        assert choice["finish_reason"] == "length"
        assert len(choice["message"]["generation_token_ids"]) == 24


def test_repeated_prompt_is_rendered_once_and_ids_stay_exact(engine, tokenizer):
    """The route caches template renders (GRPO sends each prompt G times): a hit must give the same ids."""
    body = {"messages": [{"role": "user", "content": "cache me: 3 + 4"}], "max_tokens": 1}
    first = chat(engine, body)["choices"][0]["message"]["prompt_token_ids"]
    second = chat(engine, body)["choices"][0]["message"]["prompt_token_ids"]
    expected = tokenizer.encode(tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True,
                                                              tokenize=False), add_special_tokens=False)
    assert first == second == expected
    other = chat(engine, {**body, "messages": [{"role": "user", "content": "cache me: 3 + 5"}]})
    assert other["choices"][0]["message"]["prompt_token_ids"] != expected


def test_multi_turn_carried_ids_are_contiguous(engine, tokenizer):
    messages = [{"role": "system", "content": "Answer briefly."}, *USER]
    seen: list[int] = []
    retokenization_differs = 0
    for turn in range(4):
        out = chat(engine, {"messages": messages, "max_tokens": 12, "temperature": 1.0, "seed": turn})
        m = out["choices"][0]["message"]
        assert m["prompt_token_ids"][: len(seen)] == seen, f"turn {turn}: prompt does not extend history"
        seen = m["prompt_token_ids"] + m["generation_token_ids"]
        messages.append(carried_assistant(out["choices"][0]))
        # What a client without the fix would send: the same chat, re-templated from text.
        plain = [{k: v for k, v in msg.items() if "token" not in k and "log_probs" not in k} for msg in messages]
        retemplated = tokenizer.encode(tokenizer.apply_chat_template(plain, tokenize=False),
                                       add_special_tokens=False)
        if retemplated[: len(seen) - 1] != seen[: len(seen) - 1]:
            retokenization_differs += 1
        messages.append({"role": "user", "content": f"Try again ({turn})."})
    # A random tiny model emits byte fragments and merges that re-tokenize differently: the fix mattered.
    assert retokenization_differs >= 1


def test_retokenization_case_uses_the_carried_ids(engine, tokenizer):
    # " higher" is one merged token; the "model" produced it byte by byte. Re-tokenizing the text would
    # give the merged id; the prompt must keep the carried ones.
    prompt = tokenizer.encode(tokenizer.apply_chat_template(USER, add_generation_prompt=True, tokenize=False),
                              add_special_tokens=False)
    merged = tokenizer.encode(" higher", add_special_tokens=False)
    pieces = [tokenizer.convert_tokens_to_ids(ch) for ch in tokenizer.convert_ids_to_tokens(merged)[0]]
    assert len(merged) == 1 and len(pieces) == 7 and None not in pieces
    gen = pieces + [tokenizer.eos_token_id]
    assistant = {"role": "assistant", "content": " higher", "prompt_token_ids": prompt,
                 "generation_token_ids": gen, "generation_log_probs": [-1.0] * len(gen)}
    messages = [*USER, assistant, {"role": "user", "content": "And 3 + 4?"}]
    with engine.client() as c:
        fixed = c.post("/tokenize", json={"messages": messages}).json()["tokens"]
        plain = c.post("/tokenize", json={"messages": [*USER, {"role": "assistant", "content": " higher"},
                                                        messages[-1]]}).json()["tokens"]
    assert fixed[: len(prompt) + len(gen)] == prompt + gen
    assert plain[: len(prompt) + len(gen)] != prompt + gen  # without the fix the engine would see `merged`
    assert merged[0] in plain[len(prompt):len(prompt) + 2]
    out = chat(engine, {"messages": messages, "max_tokens": 4, "temperature": 0.0})
    assert out["choices"][0]["message"]["prompt_token_ids"] == fixed


def test_tokenize_prompt_form(engine, tokenizer):
    with engine.client() as c:
        r = c.post("/tokenize", json={"prompt": "What is 2 + 3?", "add_special_tokens": False})
    assert r.status_code == 200
    assert r.json()["tokens"] == tokenizer.encode("What is 2 + 3?", add_special_tokens=False)


def test_openai_client_unchanged(engine):
    from openai import OpenAI

    client = OpenAI(base_url=f"{engine.base_url}/v1", api_key=engine.api_key)
    resp = client.chat.completions.create(
        model="sglgym-tiny", messages=USER, max_tokens=6, temperature=0.0, logprobs=True,
        extra_body={"return_tokens_as_token_ids": True},
    )
    choice = resp.choices[0]
    extra = choice.message.model_extra
    assert len(extra["generation_token_ids"]) == len(choice.logprobs.content) >= 1
    assert choice.logprobs.content[0].token == f"token_id:{extra['generation_token_ids'][0]}"
    assert resp.usage.completion_tokens == len(extra["generation_token_ids"])


def test_sglang_own_chat_route_still_reachable(engine):
    with engine.client() as c:
        r = c.post("/sglang/v1/chat/completions", json={"model": "sglgym-tiny", "messages": USER, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


BAD = [
    ("not json", None, "body"),
    ({"messages": []}, None, "messages"),
    ({}, None, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, None, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, None, "messages[0].content"),
    ({"max_tokens": 0}, "user", "max_tokens"),
    ({"max_tokens": -3}, "user", "max_tokens"),
    ({"max_tokens": 999999}, "user", "max_tokens"),
    ({"n": 100000}, "user", "n"),
    ({"temperature": "hot"}, "user", "temperature"),
    ({"tools": [{"type": "function"}]}, "user", "tools[0]"),
    ({"tool_choice": "required"}, "user", "tool_choice"),
    ({"stream": "yes"}, "user", "stream"),
    ({"functions": [{"name": "f"}]}, "user", "functions"),
    ({"best_of": 3}, "user", "best_of"),
    ({"logit_bias": {"abc": 1}}, "user", "logit_bias"),
    ({"logit_bias": {"5": 1000}}, "user", "logit_bias"),
    ({"min_tokens": -1}, "user", "min_tokens"),
    ({"response_format": {"type": "yaml"}}, "user", "response_format.type"),
    ({"required_prefix_token_ids": [1, 2]}, "user", "required_prefix_token_ids"),
    ({"no_lps": True}, "carried", "messages[1].generation_log_probs"),
    ("deep", None, "body"),
    ("surrogate", None, "body"),
    ({"ignore_eos": "yes please"}, "user", "ignore_eos"),
    ({"gen_ids": [1.5]}, "carried", "messages[1].generation_token_ids[0]"),
    ({"gen_ids": [-1]}, "carried", "messages[1].generation_token_ids[0]"),
    ({"gen_ids": [10**9]}, "carried", "messages[1].generation_token_ids[0]"),
    ({"drop_prompt": True}, "carried", "messages[1].prompt_token_ids"),
    ({"wrong_turns": True}, "carried", "messages[1].prompt_token_ids"),
    ({"long": True}, "user", "messages"),
]


@pytest.mark.parametrize("patch,kind,param", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_is_a_400_naming_the_field(engine, tokenizer, patch, kind, param):
    if patch == "not json":
        content = b'{"messages": [oops'
    elif patch == "deep":   # nested far deeper than any real request
        content = b'{"messages": [{"role": "user", "content": "x", "x": ' + b"[" * 50000 + b"]" * 50000 + b"}]}"
    elif patch == "surrogate":   # a lone UTF-16 surrogate cannot be encoded for the tokenizer
        content = b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'
    else:
        body = {"model": "sglgym-tiny", "max_tokens": 4}
        if kind == "user":
            body["messages"] = USER
        elif kind == "carried":
            prompt = tokenizer.encode(tokenizer.apply_chat_template(USER, add_generation_prompt=True,
                                                                    tokenize=False), add_special_tokens=False)
            gen = patch.get("gen_ids", [40, 41, tokenizer.eos_token_id])
            a = {"role": "assistant", "content": "x", "prompt_token_ids": prompt, "generation_token_ids": gen,
                 "generation_log_probs": [-1.0] * len(gen)}
            if patch.get("no_lps"):
                del a["generation_log_probs"]
            if patch.get("drop_prompt"):
                del a["prompt_token_ids"]
            if patch.get("wrong_turns"):  # ids from a different point of the conversation
                a["prompt_token_ids"] = prompt + [tokenizer.eos_token_id] + prompt
            body["messages"] = [*USER, a, {"role": "user", "content": "more"}]
        if patch.get("long"):
            body["messages"] = [{"role": "user", "content": "7 + 8 = 15. " * 1200}]
        body.update({k: v for k, v in patch.items()
                     if k not in ("gen_ids", "drop_prompt", "wrong_turns", "long", "no_lps")})
        content = __import__("json").dumps(body).encode()
    with engine.client() as c:
        r = c.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param, err
        assert err["message"]
        if param == "messages" and isinstance(patch, dict) and patch.get("long"):
            assert "context length" in err["message"]
        # the server keeps serving afterwards
        assert c.get("/health").status_code == 200


def test_context_length_message_for_nemo_gym(engine):
    with engine.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "1 + 1 " * 3000}]})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]


def test_api_key_protects_our_routes(engine):
    for path, body in (("/v1/chat/completions", {"messages": USER, "max_tokens": 2}),
                       ("/tokenize", {"messages": USER})):
        assert httpx.post(f"{engine.base_url}{path}", json=body, timeout=30).status_code == 401
        assert httpx.post(f"{engine.base_url}{path}", json=body, timeout=30,
                          headers={"Authorization": "Bearer wrong"}).status_code == 401
        with engine.client() as c:
            assert c.post(path, json=body).status_code == 200
