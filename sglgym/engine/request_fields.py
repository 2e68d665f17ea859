"""Chat fields beyond the core ones: each either maps to an SGLang sampling parameter or is refused.

A field that changes what the model generates is never dropped silently: the client would train or
evaluate on outputs it did not ask for. Fields that only label a request (`user`, `metadata`, ...) are
ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import json
from typing import Any

from .protocol import ApiError, Carried, token_id_list

# Generation-changing OpenAI / vLLM fields this route does not implement, with what to use instead.
REFUSED = {
    "functions": "use 'tools'",
    "function_call": "use 'tool_choice'",
    "logit_bias_type": "not supported",
    "best_of": "sample with 'n' and pick on the client",
    "use_beam_search": "beam search is not served on this route",
    "echo": "not supported on chat",
    "prediction": "predicted outputs are not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "web_search_options": "web search is not supported",
    "guided_json": "use response_format {type: json_schema}",
    "guided_regex": "not supported on this route",
    "guided_grammar": "not supported on this route",
    "guided_choice": "not supported on this route",
    "add_generation_prompt": "the route adds the generation prompt unless continue_final_message is true",
    "reasoning_effort": "pass it to the chat template with chat_template_kwargs",
    "verbosity": "not supported",
}


def refuse_unsupported(body: dict) -> None:
    continuing = body.get("continue_final_message") is True
    for name, instead in REFUSED.items():
        if name == "add_generation_prompt" and continuing and body.get(name) is False:
            continue   # vLLM's spelling of a continuation: both fields together
        if body.get(name) is not None:
            raise ApiError(f"'{name}' is not supported on this route ({instead})", param=name)


def _logit_bias(value: Any, vocab_size: int) -> dict[str, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError("'logit_bias' must be an object of token id -> bias", param="logit_bias")
    bias = {}
    for key, b in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise ApiError(f"'logit_bias' key {key!r} is not a token id", param="logit_bias") from None
        if not 0 <= token < vocab_size:
            raise ApiError(f"'logit_bias' key {token} is outside the vocabulary [0, {vocab_size})",
                           param="logit_bias")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise ApiError(f"'logit_bias[{key}]' must be a number in [-100, 100], got {b!r}", param="logit_bias")
        bias[str(token)] = float(b)
    return bias or None


def _response_format(value: Any) -> dict:
    """OpenAI `response_format` as an SGLang grammar constraint."""
    if value is None:
        return {}
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": json.dumps({"type": "object"})}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError("'response_format.json_schema.schema' must be a JSON schema object",
                           param="response_format.json_schema.schema")
        return {"json_schema": json.dumps(schema)}
    raise ApiError("'response_format.type' must be 'text', 'json_object' or 'json_schema'",
                   param="response_format.type")


def sampling_extras(body: dict, vocab_size: int) -> dict:
    """SGLang sampling params for the supported extra fields (min_tokens, logit_bias, response_format)."""
    refuse_unsupported(body)
    extras = _response_format(body.get("response_format"))
    min_tokens = body.get("min_tokens")
    if min_tokens is not None:
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
            raise ApiError(f"'min_tokens' must be a non-negative integer, got {min_tokens!r}", param="min_tokens")
        extras["min_new_tokens"] = min_tokens
    bias = _logit_bias(body.get("logit_bias"), vocab_size)
    if bias:
        extras["logit_bias"] = bias
    return extras


def required_prefix(body: dict, vocab_size: int) -> list[int] | None:
    """`required_prefix_token_ids` (NeMo Gym >= 0.5 / NeMo RL): the ids the prompt must start with."""
    value = body.get("required_prefix_token_ids")
    if value is None:
        return None
    ids = token_id_list(value, "required_prefix_token_ids", vocab_size)
    return list(ids) or None


def with_required_prefix(messages: list[dict], carried: list[Carried], prefix_ids: list[int] | None,
                         ) -> list[Carried]:
    """The carried ids with a required prefix applied to the last assistant message.

    NeMo RL sends the conversation's ids so far (last prompt + generation) this way instead of on the
    message; both forms must agree when a client sends both.
    """
    if not prefix_ids:
        return carried
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ApiError("'required_prefix_token_ids' needs an assistant message to continue from",
                       param="required_prefix_token_ids")
    if carried and carried[-1].message_index == last:
        if carried[-1].prefix_ids != prefix_ids:
            raise ApiError(f"'required_prefix_token_ids' differs from the ids carried on messages[{last}]",
                           param="required_prefix_token_ids")
        return carried
    if carried and prefix_ids[:len(carried[-1].prefix_ids)] != carried[-1].prefix_ids:
        raise ApiError(f"'required_prefix_token_ids' does not start with the ids carried on "
                       f"messages[{carried[-1].message_index}]", param="required_prefix_token_ids")
    return [*carried, Carried(last, list(prefix_ids), [])]


def choice_seed(seed: int, index: int) -> int:
    """The sampling seed of choice `index` of a request seeded with `seed` (choice 0: the seed itself).

    `seed + index` would make choice 1 of seed 11 the same sample as choice 0 of seed 12; a splitmix64
    step of (seed, index) keeps every (seed, choice) apart. Kept in int64, as SGLang stores seeds.
    """
    if index == 0:
        return seed % (1 << 63)
    z = (seed * 0x9E3779B97F4A7C15 + index) & (1 << 64) - 1
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & (1 << 64) - 1
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & (1 << 64) - 1
    return (z ^ (z >> 31)) % (1 << 63)
