"""Parsing and validation of the chat / tokenize request bodies.

Every problem becomes an `ApiError` naming the offending field (OpenAI-style 400 body), never a 500.
Requests are plain dataclasses; unknown OpenAI fields that do not change generation are ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import orjson

MAX_N = 64  # samples per request; larger n is almost always a client bug
ROLES = ("system", "developer", "user", "assistant", "tool")
CARRIED_FIELDS = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")
STRING_FIELDS = ("reasoning_content", "reasoning", "name", "tool_call_id")
# Carried alongside the ids by NeMo Gym >= 0.5 for MoE routing replay: opaque here, never templated.
CARRIED_EXTRA_FIELDS = ("routed_experts",)


class ApiError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.type = message, param, status, type_

    def body(self) -> dict:
        return {"object": "error", "error": {"message": self.message, "type": self.type,
                                             "param": self.param, "code": self.status}}


@dataclass
class Carried:
    """Token ids carried on an assistant message (what the engine saw and sampled for that turn)."""
    message_index: int
    prompt_token_ids: list[int]
    generation_token_ids: list[int]

    @property
    def prefix_ids(self) -> list[int]:
        return self.prompt_token_ids + self.generation_token_ids


@dataclass
class ChatRequest:
    messages: list[dict]                     # template-ready: carried id fields stripped
    carried: list[Carried]
    tools: list[dict] | None = None
    tool_choice: Any = "auto"               # "auto" | "none" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict = field(default_factory=dict)
    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    max_tokens: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    return_tokens_as_token_ids: bool = False
    skip_special_tokens: bool = True
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False           # SGLang/vLLM extension: generate max_tokens (benchmarks)
    stream: bool = False
    continue_final_message: bool = False   # vLLM: extend the last (assistant) message instead of a new turn


def parse_json_body(raw: bytes) -> dict:
    # orjson bounds nesting (1024 levels) and rejects lone UTF-16 surrogates, which the json module
    # accepts and which later fail deep in the template or the tokenizer
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ApiError(f"request body is not valid JSON: {e}", param="body") from None
    if not isinstance(body, dict):
        raise ApiError("request body must be a JSON object", param="body")
    return body


def _number(body: dict, name: str, default, lo=None, hi=None, integer=False):
    value = body.get(name)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
        raise ApiError(f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", param=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ApiError(f"'{name}' must be in [{lo}, {hi}], got {value!r}", param=name)
    return value


def _string(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise ApiError(f"'{name}' must be a string, got {value!r}"[:200], param=name)
    return value


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(f"'{name}' must be a boolean, got {value!r}", param=name)
    return value


def token_id_list(value: Any, param: str, vocab_size: int) -> list[int]:
    if not isinstance(value, list):
        raise ApiError(f"'{param}' must be a list of token ids", param=param)
    for j, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int):
            raise ApiError(f"'{param}[{j}]' must be an integer token id, got {t!r}", param=f"{param}[{j}]")
        if t < 0 or t >= vocab_size:
            raise ApiError(f"'{param}[{j}]' = {t} is outside the vocabulary [0, {vocab_size})",
                           param=f"{param}[{j}]")
    return value


def _content_text(content: Any, param: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text parts are supported here
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text", "output_text"):
                raise ApiError(f"'{param}[{j}]' must be a text content part", param=f"{param}[{j}]")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise ApiError(f"'{param}' must be a string or a list of text parts", param=param)


def parse_messages(raw_messages: Any, vocab_size: int) -> tuple[list[dict], list[Carried]]:
    if not isinstance(raw_messages, list) or not raw_messages:
        raise ApiError("'messages' must be a non-empty list", param="messages")
    messages, carried = [], []
    for i, m in enumerate(raw_messages):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(f"'{p}' must be an object", param=p)
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(f"'{p}.role' must be one of {', '.join(ROLES)}; got {role!r}", param=f"{p}.role")
        msg = {k: v for k, v in m.items() if k not in CARRIED_FIELDS and k not in CARRIED_EXTRA_FIELDS}
        msg["role"] = "system" if role == "developer" else role
        msg["content"] = _content_text(m.get("content"), f"{p}.content")
        if msg["content"] is None and role != "assistant":
            raise ApiError(f"'{p}.content' is required for role {role!r}", param=f"{p}.content")
        for name in STRING_FIELDS:
            if m.get(name) is not None and not isinstance(m[name], str):
                raise ApiError(f"'{p}.{name}' must be a string", param=f"{p}.{name}")
        if role == "assistant":
            msg["reasoning_content"] = m.get("reasoning_content") or m.get("reasoning")
            if msg.get("tool_calls") is not None:
                _check_tool_calls(msg["tool_calls"], f"{p}.tool_calls")
        elif m.get("tool_calls") is not None:
            raise ApiError(f"'{p}.tool_calls' is only allowed on assistant messages", param=f"{p}.tool_calls")
        bundle = _carried_bundle(m, p, role, vocab_size)
        if bundle is not None:
            prompt, gen = bundle
            if carried and prompt[:len(carried[-1].prefix_ids)] != carried[-1].prefix_ids:
                prev = carried[-1].message_index
                raise ApiError(f"'{p}.prompt_token_ids' does not start with the prompt and generation ids "
                               f"carried on messages[{prev}]: the carried ids are inconsistent with the "
                               "messages", param=f"{p}.prompt_token_ids")
            carried.append(Carried(i, prompt, gen))
        messages.append(msg)
    return messages, carried


def _carried_bundle(m: dict, p: str, role: str, vocab_size: int) -> tuple[list[int], list[int]] | None:
    """(prompt ids, generation ids) carried on a message, validated as one unit (all three fields or
    none, as NeMo Gym sends them). An all-empty bundle carries nothing."""
    present = [f for f in CARRIED_FIELDS if m.get(f) is not None]
    if not present:
        return None
    if role != "assistant":
        raise ApiError(f"'{p}.{present[0]}' is only allowed on assistant messages", param=f"{p}.{present[0]}")
    missing = [f for f in CARRIED_FIELDS if m.get(f) is None]
    if missing:
        raise ApiError(f"'{p}.{missing[0]}' is required when {p} carries {', '.join(present)}: the token "
                       f"ids travel as one bundle ({', '.join(CARRIED_FIELDS)})", param=f"{p}.{missing[0]}")
    prompt = token_id_list(m["prompt_token_ids"], f"{p}.prompt_token_ids", vocab_size)
    gen = token_id_list(m["generation_token_ids"], f"{p}.generation_token_ids", vocab_size)
    lps = m["generation_log_probs"]
    if not isinstance(lps, list) or len(lps) != len(gen):
        raise ApiError(f"'{p}.generation_log_probs' must be a list as long as generation_token_ids "
                       f"({len(gen)})", param=f"{p}.generation_log_probs")
    if not prompt and not gen:
        return None
    if not prompt:
        raise ApiError(f"'{p}.prompt_token_ids' must not be empty when generation_token_ids is not",
                       param=f"{p}.prompt_token_ids")
    return list(prompt), list(gen)


def _check_tool_calls(calls: Any, param: str) -> None:
    if not isinstance(calls, list):
        raise ApiError(f"'{param}' must be a list", param=param)
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(f"'{param}[{j}].function.name' is required", param=f"{param}[{j}].function.name")
        if fn.get("arguments") is not None and not isinstance(fn["arguments"], (str, dict)):
            raise ApiError(f"'{param}[{j}].function.arguments' must be a JSON string or an object",
                           param=f"{param}[{j}].function.arguments")


def parse_tools(body: dict) -> list[dict] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ApiError("'tools' must be a list", param="tools")
    for j, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ApiError(f"'tools[{j}]' must be {{type: 'function', function: {{name, parameters}}}}",
                           param=f"tools[{j}]")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise ApiError(f"'tools[{j}].function.parameters' must be a JSON schema object",
                           param=f"tools[{j}].function.parameters")
    return tools or None


def parse_template_kwargs(body: dict) -> dict:
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ApiError("'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    return kwargs


def parse_chat_request(body: dict, vocab_size: int) -> ChatRequest:
    messages, carried = parse_messages(body.get("messages"), vocab_size)
    tools = parse_tools(body)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _number({name: max_tokens}, name, None, lo=1, integer=True)
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError("'stop' must be a string or a list of non-empty strings", param="stop")
    top_k = body.get("top_k")
    if top_k is not None:
        top_k = _number(body, "top_k", None, lo=-1, integer=True)
    logprobs = _bool(body, "logprobs", False)
    return ChatRequest(
        messages=messages, carried=carried, tools=tools,   # tool_choice: toolchoice.parse_tool_choice
        chat_template_kwargs=parse_template_kwargs(body), model=_string(body, "model"),
        temperature=_number(body, "temperature", 1.0, lo=0.0, hi=100.0),
        top_p=_number(body, "top_p", 1.0, lo=1e-9, hi=1.0),
        top_k=top_k,
        min_p=_number(body, "min_p", 0.0, lo=0.0, hi=1.0),
        max_tokens=max_tokens,
        n=_number(body, "n", 1, lo=1, hi=MAX_N, integer=True),
        stop=stop,
        stop_token_ids=token_id_list(body.get("stop_token_ids") or [], "stop_token_ids", vocab_size),
        seed=_number(body, "seed", None, lo=-(2**63), hi=2**63 - 1, integer=True),
        logprobs=logprobs,
        top_logprobs=_number(body, "top_logprobs", 0, lo=0, hi=20, integer=True),
        return_tokens_as_token_ids=_bool(body, "return_tokens_as_token_ids", False),
        skip_special_tokens=_bool(body, "skip_special_tokens", True),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, lo=-2.0, hi=2.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, lo=-2.0, hi=2.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, lo=0.0, hi=2.0),
        ignore_eos=_bool(body, "ignore_eos", False),
        stream=_bool(body, "stream", False),
        continue_final_message=_continue_final(body, messages),
    )


def _continue_final(body: dict, messages: list[dict]) -> bool:
    if not _bool(body, "continue_final_message", False):
        return False
    if messages[-1].get("role") != "assistant":
        raise ApiError("'continue_final_message' needs the last message to be an assistant message "
                       f"(it is {messages[-1].get('role')!r})", param="continue_final_message")
    return True
