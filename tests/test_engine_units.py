"""Engine pieces that need no server: tool/reasoning splitting with SGLang's parsers, sampling checks,
the CPU stand-in for sgl_kernel, and the tiny model build."""

import json

import pytest
import torch

from sglgym.engine.protocol import ApiError, parse_chat_request
from sglgym.engine.responses import split_generated_text
from sglgym.engine.routes import EngineRoutes, RouteOptions

TOOLS = [{"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}]


def test_tool_calls_parsed_with_sglang_parser():
    text = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    content, reasoning, calls = split_generated_text(text, TOOLS, "qwen25", None)
    assert content.strip() == "Let me add." and reasoning is None
    assert len(calls) == 1 and calls[0]["function"]["name"] == "add"
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 2, "b": 3}
    # no tools in the request: the text is left alone
    assert split_generated_text(text, None, "qwen25", None) == (text, None, [])


def test_reasoning_split():
    content, reasoning, _ = split_generated_text("<think>\n7 and 8\n</think>\n15", None, None, "qwen3")
    assert reasoning.strip() == "7 and 8" and content.strip() == "15"


def test_training_sampling_checks():
    routes = EngineRoutes(RouteOptions(training_temperature=1.0, training_top_p=1.0))
    ok = parse_chat_request({"messages": [{"role": "user", "content": "x"}]}, 512)
    routes._check_sampling(ok)
    for field, value in (("temperature", 0.7), ("top_p", 0.9), ("top_k", 20)):
        req = parse_chat_request({"messages": [{"role": "user", "content": "x"}], field: value}, 512)
        with pytest.raises(ApiError) as e:
            routes._check_sampling(req)
        assert e.value.param == field
    EngineRoutes(RouteOptions())._check_sampling(
        parse_chat_request({"messages": [{"role": "user", "content": "x"}], "top_k": 5}, 512))


def test_cpu_stand_in_assign_req_to_token_pool():
    import importlib.util
    from sglgym.engine.launch import CPU_SHIM_DIR

    spec = importlib.util.spec_from_file_location("shim", CPU_SHIM_DIR / "sgl_kernel" / "__init__.py")
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    table = torch.zeros(3, 8, dtype=torch.int32)
    shim.assign_req_to_token_pool_cpu(torch.tensor([2, 0]), table, torch.tensor([1, 0]), torch.tensor([4, 2]),
                                      torch.tensor([10, 11, 12, 20, 21]), 8)
    assert table[2, 1:4].tolist() == [10, 11, 12] and table[0, :2].tolist() == [20, 21]
    assert table.sum().item() == 10 + 11 + 12 + 20 + 21
    with pytest.raises(NotImplementedError, match="speculative decoding"):
        shim.verify_tree_greedy_cpu()


def test_tiny_model_is_deterministic(tmp_path, tiny_model_path):
    from safetensors.torch import load_file
    from sglgym.models import build_tiny_model

    again = build_tiny_model(tmp_path / "again")
    a, b = load_file(f"{tiny_model_path}/model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (again / "tokenizer.json").read_text() == open(f"{tiny_model_path}/tokenizer.json").read()
    merges = json.loads((again / "tokenizer.json").read_text())["model"]["merges"]
    assert len(merges) > 100  # a real BPE: re-tokenizing text can merge what was generated apart


def test_prompt_cache_returns_copies_and_is_bounded(tokenizer):
    from sglgym.engine.prompt import PromptBuilder

    builder = PromptBuilder(tokenizer, cache_size=2)
    chats = [[{"role": "user", "content": f"what is {i} + 1?"}] for i in range(3)]
    first = builder.render_ids(chats[0], None, {}, True)
    first.append(-1)  # a caller mutating its ids must not change the cache
    again = builder.render_ids(chats[0], None, {}, True)
    assert builder.cache_hits == 1 and again[-1] != -1
    assert again == tokenizer.encode(tokenizer.apply_chat_template(chats[0], add_generation_prompt=True,
                                                                   tokenize=False), add_special_tokens=False)
    # a different add_generation_prompt or template kwarg is another key
    assert builder.render_ids(chats[0], None, {}, False) != again
    builder.render_ids(chats[1], None, {}, True)
    builder.render_ids(chats[2], None, {}, True)
    assert len(builder._cache) == 2
    off = PromptBuilder(tokenizer, cache_size=0)
    off.render_ids(chats[0], None, {}, True)
    off.render_ids(chats[0], None, {}, True)
    assert off.cache_hits == 0 and not off._cache
