"""tool_choice "required" / a named function and parallel_tool_calls, through SGLang's constrained decoding.

Unit tests check the parsing/validation and compile the structural tag with XGrammar against the tiny
model's tokenizer (what it accepts and rejects). Live tests use a real `sglgym serve` (CPU, tiny random
model, `--tool-call-parser qwen25`) through the official OpenAI SDK: the random model essentially never
writes a tool call on its own (checked with tool_choice "auto"), so every call seen under "required" or a
named function is the grammar's doing.
"""

from __future__ import annotations

import json

import pytest

from sglgym.engine.protocol import ApiError, parse_chat_request
from sglgym.engine.responses import split_generated_text
from sglgym.engine.toolchoice import parse_tool_choice, tool_choice_sampling

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["paris", "rome"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
USER = [{"role": "user", "content": "What is the weather in Paris? And what is 2 + 3?"}]
NAMED_ADD = {"type": "function", "function": {"name": "add"}}
MAX_TOKENS = 128    # one call of these schemas takes ~35-65 tokens of the tiny model


def call(name: str, args: dict) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(args)}}}\n</tool_call>'


def check_arguments(name: str, arguments: str) -> None:
    """The call's arguments satisfy its tool's schema (the small subset these schemas use)."""
    tool = {t["function"]["name"]: t for t in TOOLS}[name]
    schema = tool["function"]["parameters"]
    args = json.loads(arguments)
    assert isinstance(args, dict)
    assert set(schema["required"]) <= set(args) <= set(schema["properties"]), (name, args)
    for key, value in args.items():
        prop = schema["properties"][key]
        if "enum" in prop:
            assert value in prop["enum"], (name, args)
        if prop["type"] == "integer":
            assert isinstance(value, int) and prop["minimum"] <= value <= prop["maximum"], (name, args)


# --- parsing and validation -------------------------------------------------------------------------
def parse(**body):
    """A chat body parsed as the route does: the request, then its tool_choice against its tools."""
    body = {"messages": USER, **body}
    req = parse_chat_request(body, vocab_size=512)
    req.tool_choice, req.parallel_tool_calls = parse_tool_choice(body, req.tools)
    return req


def test_parse_defaults_and_plain_choices():
    req = parse(tools=TOOLS)
    assert (req.tool_choice, req.parallel_tool_calls) == ("auto", True)
    for choice in ("auto", "none", "required"):
        assert parse(tools=TOOLS, tool_choice=choice).tool_choice == choice
    assert parse(tool_choice="none").tool_choice == "none"   # no tools: auto/none limit nothing
    assert parse(tools=TOOLS, tool_choice="required", parallel_tool_calls=False).parallel_tool_calls is False


def test_parse_named_function():
    req = parse(tools=TOOLS, tool_choice=NAMED_ADD)
    assert req.tool_choice == NAMED_ADD
    # the Responses API shape names the function at the top level
    assert parse(tools=TOOLS, tool_choice={"type": "function", "name": "add"}).tool_choice == NAMED_ADD


@pytest.mark.parametrize("body,param,words", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tool_choice": NAMED_ADD}, "tool_choice", "no 'tools'"),
    ({"tool_choice": "required"}, "tool_choice", "no 'tools'"),
    ({"tools": TOOLS, "tool_choice": "any"}, "tool_choice", "'required'"),
    ({"tools": TOOLS, "tool_choice": {"type": "allowed_tools"}}, "tool_choice", "function"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {}}}, "tool_choice", "name"),
    ({"tools": TOOLS, "tool_choice": 3}, "tool_choice", "'required'"),
    ({"tools": TOOLS, "parallel_tool_calls": "no"}, "parallel_tool_calls", "boolean"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice", "response_format"),
])
def test_parse_errors_name_the_field(body, param, words):
    with pytest.raises(ApiError) as e:
        parse(**body)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message


def test_parse_tool_choice_alone():
    assert parse_tool_choice({}, None) == ("auto", True)
    assert parse_tool_choice({"tool_choice": "required", "parallel_tool_calls": False}, TOOLS) == ("required", False)


# --- the constraint ---------------------------------------------------------------------------------
def test_no_constraint_unless_a_call_is_forced():
    for choice in ("auto", "none"):
        assert tool_choice_sampling(TOOLS, choice, True, "qwen25") == {}
    assert tool_choice_sampling(None, "auto", True, None) == {}


def test_constraint_is_a_structural_tag_over_the_allowed_tools():
    required = json.loads(tool_choice_sampling(TOOLS, "required", True, "qwen25")["structural_tag"])
    fmt = required["format"]
    assert fmt["type"] == "tags_with_separator" and fmt["at_least_one"] and not fmt["stop_after_first"]
    assert [t["begin"] for t in fmt["tags"]] == ['<tool_call>\n{"name": "get_weather", "arguments": ',
                                                 '<tool_call>\n{"name": "add", "arguments": ']
    named = json.loads(tool_choice_sampling(TOOLS, NAMED_ADD, False, "qwen")["structural_tag"])["format"]
    assert [t["begin"] for t in named["tags"]] == ['<tool_call>\n{"name": "add", "arguments": ']
    assert named["stop_after_first"]


@pytest.mark.parametrize("kw,param,words", [
    ({"tool_call_parser": None}, "tool_choice", "--tool-call-parser"),
    ({"tool_call_parser": "llama3"}, "tool_choice", "--tool-call-parser"),
    ({"grammar_backend": "llguidance"}, "tool_choice", "--grammar-backend xgrammar"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "multipleOf": 3}}}}}]},
     "tools[0].function.parameters", "multipleOf"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters", "object"),
])
def test_constraint_errors(kw, param, words):
    args = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": True, "tool_call_parser": "qwen25",
            "grammar_backend": "xgrammar", **kw}
    with pytest.raises(ApiError) as e:
        tool_choice_sampling(**args)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message


@pytest.fixture(scope="module")
def compiler(tokenizer):
    import xgrammar
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tokenizer.name_or_path).vocab_size
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab,
                                                   stop_token_ids=[tokenizer.eos_token_id])
    return xgrammar.GrammarCompiler(info)


def accepts(compiler, eos: int, params: dict, text: str) -> bool:
    """Whether the grammar takes `text` as a complete output (then EOS ends it)."""
    import xgrammar

    matcher = xgrammar.GrammarMatcher(compiler.compile_structural_tag(params["structural_tag"]))
    return matcher.accept_string(text) and matcher.accept_token(eos) and matcher.is_terminated()


def test_grammar_required(compiler, tokenizer):
    params = tool_choice_sampling(TOOLS, "required", True, "qwen25")
    ok = [call("add", {"a": 2, "b": 3}),
          call("get_weather", {"city": "paris"}),
          call("get_weather", {"city": "rome", "days": 7}) + "\n" + call("add", {"a": 0, "b": 99})]
    bad = ["", "Sure. " + call("add", {"a": 2, "b": 3}),            # no call / text before the call
           call("add", {"a": 2}),                                    # a required key missing
           call("add", {"a": 2, "b": 3, "c": 4}),                    # a key the schema does not have
           call("add", {"a": 2, "b": 300}),                          # out of range
           call("get_weather", {"city": "london"}),                  # not in the enum
           call("mul", {"a": 2, "b": 3}),                            # not a tool
           call("add", {"a": 2, "b": 3}) + " done",                  # text after the calls
           '<tool_call>\n{"name":"add", "arguments": {"a": 2, "b": 3}}\n</tool_call>']   # other spacing
    assert all(accepts(compiler, tokenizer.eos_token_id, params, t) for t in ok)
    assert not any(accepts(compiler, tokenizer.eos_token_id, params, t) for t in bad)
    # what the grammar accepts is what the server's parser reads as calls
    _, _, calls = split_generated_text(ok[2], TOOLS, "qwen25", None)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "rome", "days": 7}), ("add", {"a": 0, "b": 99})]


def test_grammar_named_and_single_call(compiler, tokenizer):
    eos = tokenizer.eos_token_id
    two = call("add", {"a": 1, "b": 2}) + "\n" + call("add", {"a": 3, "b": 4})
    named = tool_choice_sampling(TOOLS, NAMED_ADD, True, "qwen25")
    assert accepts(compiler, eos, named, call("add", {"a": 1, "b": 2})) and accepts(compiler, eos, named, two)
    assert not accepts(compiler, eos, named, call("get_weather", {"city": "rome"}))
    single = tool_choice_sampling(TOOLS, NAMED_ADD, False, "qwen25")
    assert accepts(compiler, eos, single, call("add", {"a": 1, "b": 2}))
    assert not accepts(compiler, eos, single, two)
    one_of_any = tool_choice_sampling(TOOLS, "required", False, "qwen25")
    assert accepts(compiler, eos, one_of_any, call("get_weather", {"city": "rome"}))
    assert not accepts(compiler, eos, one_of_any, call("get_weather", {"city": "rome"}) + "\n" + call("add", {"a": 1, "b": 2}))


def test_grammar_tool_without_parameters(compiler, tokenizer):
    tools = [{"type": "function", "function": {"name": "ping"}}]
    params = tool_choice_sampling(tools, "required", True, "qwen25")
    assert accepts(compiler, tokenizer.eos_token_id, params, call("ping", {}))
    assert not accepts(compiler, tokenizer.eos_token_id, params, call("ping", {"x": 1}))


# --- live: a real `sglgym serve` through the OpenAI SDK ----------------------------------------------
@pytest.fixture(scope="module")
def client(engine):
    import openai
    return openai.OpenAI(base_url=engine.base_url + "/v1", api_key=engine.api_key, timeout=300, max_retries=0)


def create(client, **kw):
    args = {"model": "sglgym-tiny", "messages": USER, "tools": TOOLS, "n": 4, "temperature": 1.0,
            "max_tokens": MAX_TOKENS, **kw}
    return client.chat.completions.create(**args)


def check_choice(choice, eos: int, allowed: set[str]) -> list:
    """Every call is complete, to an allowed tool, with schema-valid arguments; the finish reason fits."""
    calls = choice.message.tool_calls or []
    gen = choice.message.model_extra["generation_token_ids"]
    for c in calls:
        assert c.type == "function" and c.function.name in allowed, c
        check_arguments(c.function.name, c.function.arguments)
    if choice.finish_reason == "tool_calls":   # the grammar ended and the model could only close the turn
        assert calls and gen[-1] == eos and choice.message.content is None
    else:                                      # cut by max_tokens inside a call: that call is not returned
        assert choice.finish_reason == "length" and len(gen) == MAX_TOKENS, choice
    return calls


def test_required_calls_one_of_the_tools(client, tokenizer):
    resp = create(client, tool_choice="required")
    assert len(resp.choices) == 4
    for choice in resp.choices:
        assert len(check_choice(choice, tokenizer.eos_token_id, {"get_weather", "add"})) >= 1, choice


def test_named_function_is_the_only_one_called(client, tokenizer):
    resp = create(client, tool_choice=NAMED_ADD)
    for choice in resp.choices:
        calls = check_choice(choice, tokenizer.eos_token_id, {"add"})
        assert len(calls) >= 1 and {c.function.name for c in calls} == {"add"}, choice


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_no_parallel_calls_means_exactly_one(client, tokenizer, tool_choice):
    resp = create(client, tool_choice=tool_choice, parallel_tool_calls=False)
    allowed = {"get_weather", "add"} if tool_choice == "required" else {"get_weather"}
    for choice in resp.choices:
        calls = check_choice(choice, tokenizer.eos_token_id, allowed)
        assert len(calls) == 1 and choice.finish_reason == "tool_calls", choice


def test_without_the_constraint_the_model_does_not_call(client):
    """The same requests with "auto": the random model writes no call, so the calls above are the grammar's."""
    resp = create(client, tool_choice="auto")
    assert sum(len(c.message.tool_calls or []) for c in resp.choices) == 0
    assert all(c.finish_reason in ("stop", "length") for c in resp.choices)


def test_cut_inside_the_call_is_not_a_call(client):
    resp = create(client, tool_choice="required", max_tokens=8, n=1)
    choice = resp.choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert len(choice.message.model_extra["generation_token_ids"]) == 8


def test_streaming_required(client, tokenizer):
    stream = create(client, tool_choice="required", parallel_tool_calls=False, n=1, stream=True)
    names, args, finish = [], "", None
    for chunk in stream:
        for choice in chunk.choices:
            for d in choice.delta.tool_calls or []:
                names += [d.function.name] if d.function and d.function.name else []
                args += (d.function.arguments or "") if d.function else ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and len(names) == 1 and names[0] in ("get_weather", "add")
    check_arguments(names[0], args)


@pytest.mark.parametrize("kw,param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required", "tools": None}, "tool_choice"),
    ({"tool_choice": "required", "parallel_tool_calls": "no"}, "parallel_tool_calls"),
])
def test_bad_tool_choice_is_a_400(client, kw, param):
    import openai

    args = {"model": "sglgym-tiny", "messages": USER, "tools": TOOLS, "max_tokens": 4, **kw}
    if args["tools"] is None:
        del args["tools"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    assert e.value.status_code == 400 and e.value.param == param
