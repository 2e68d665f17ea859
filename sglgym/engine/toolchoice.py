"""`tool_choice` "required" / a named function, and `parallel_tool_calls`, through SGLang's constrained decoding.

OpenAI semantics: "required" makes the model call one or more of `tools` (exactly one with
`parallel_tool_calls: false`); `{"type": "function", "function": {"name": X}}` makes it call X (one or
more calls of X, exactly one without parallel calls). "auto" and "none" add no constraint.

The constraint is an XGrammar structural tag in the request's sampling params (`structural_tag`), which
SGLang's grammar backend (xgrammar, its default; it masks logits on CPU too) compiles and applies per
token. SGLang's own chat route builds the same kind of tag for the `qwen25` parser
(`FunctionCallParser.get_structure_constraint`), but its legacy tag ignores the named tool and
`parallel_tool_calls` and leaves non-strict arguments unconstrained; this one constrains all three:

    root      ::= call ("\\n" call)*         (one call only: named/required without parallel calls)
    call      ::= "<tool_call>\\n{\\"name\\": \\"NAME\\", \\"arguments\\": " ARGS "}\\n</tool_call>"
    ARGS      ::= compact JSON (", " / ": " separators, as the chat template's `tojson`) valid for
                  NAME's `parameters` schema (strict: no keys outside `properties`)

Nothing is allowed before, between (but the separator) or after the calls, so the grammar ends after the
last call and only EOS can follow: a finished choice parses as calls with the server's tool parser and
ends with finish_reason "tool_calls". A choice cut by `max_tokens` (or a `stop` string) ends mid-call;
its unfinished call is not returned as a call (the parser needs the closing tag).
"""

from __future__ import annotations

import json
from typing import Any

from .protocol import ApiError

# Parsers whose call format the tag below writes: `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`.
HERMES_PARSERS = ("qwen25", "qwen")
CALL_BEGIN = '<tool_call>\n{"name": '
ARGS_FIELD = ', "arguments": '
CALL_END = "}\n</tool_call>"
CALL_SEPARATOR = "\n"


def parse_tool_choice(body: dict, tools: list[dict] | None) -> tuple[Any, bool]:
    """(tool_choice, parallel_tool_calls) of a chat body, validated against the parsed `tools`.

    tool_choice is normalised to "auto", "none", "required" or {"type": "function", "function": {"name": X}}.
    """
    parallel = body.get("parallel_tool_calls")
    if parallel is None:
        parallel = True
    elif not isinstance(parallel, bool):
        raise ApiError(f"'parallel_tool_calls' must be a boolean, got {parallel!r}", param="parallel_tool_calls")

    choice = body.get("tool_choice")
    if choice is None:
        return "auto", parallel
    names = [t["function"]["name"] for t in tools or []]
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise ApiError(f"'tool_choice' must be 'auto', 'none', 'required' or "
                           f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}; got {choice!r}",
                           param="tool_choice")
        if choice == "required" and not names:
            raise ApiError("'tool_choice' is 'required' but the request has no 'tools'", param="tool_choice")
        if choice == "required":
            _check_no_response_format(body)
        return choice, parallel
    if not isinstance(choice, dict) or choice.get("type") != "function":
        raise ApiError("'tool_choice' must be 'auto', 'none', 'required' or "
                       "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else choice.get("name")  # also the Responses API shape
    if not isinstance(name, str) or not name:
        raise ApiError("'tool_choice.function.name' must be a non-empty string", param="tool_choice")
    if not names:
        raise ApiError(f"'tool_choice' names the function {name!r} but the request has no 'tools'",
                       param="tool_choice")
    if name not in names:
        raise ApiError(f"'tool_choice' names the function {name!r}, which is not among 'tools' "
                       f"({', '.join(names)})", param="tool_choice")
    _check_no_response_format(body)
    return {"type": "function", "function": {"name": name}}, parallel


def _check_no_response_format(body: dict) -> None:
    """A forced call is the whole output; SGLang takes one grammar per request, so no JSON answer format too."""
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
        raise ApiError("'tool_choice' 'required' or a named function cannot be combined with 'response_format' "
                       f"{fmt.get('type')!r}: the output is the tool call(s)", param="tool_choice")


def forced_tool_names(tools: list[dict] | None, tool_choice: Any) -> list[str] | None:
    """Names the model must call from, or None when tool_choice does not force a call."""
    if isinstance(tool_choice, dict):
        return [tool_choice["function"]["name"]]
    if tool_choice == "required":
        return [t["function"]["name"] for t in tools or []]
    return None


def tool_choice_sampling(tools: list[dict] | None, tool_choice: Any, parallel_tool_calls: bool,
                         tool_call_parser: str | None, grammar_backend: str | None = "xgrammar") -> dict:
    """Extra sampling params for SGLang's `GenerateReqInput` ({} when nothing is forced)."""
    names = forced_tool_names(tools, tool_choice)
    if names is None:
        return {}
    what = "'required'" if tool_choice == "required" else "a named function"
    if tool_call_parser not in HERMES_PARSERS:
        raise ApiError(f"'tool_choice' {what} needs the server's --tool-call-parser to be one of "
                       f"{', '.join(HERMES_PARSERS)} (it is {tool_call_parser!r})", param="tool_choice")
    if grammar_backend not in (None, "xgrammar"):
        raise ApiError(f"'tool_choice' {what} needs the server's --grammar-backend xgrammar "
                       f"(it is {grammar_backend!r})", param="tool_choice")
    by_name = {t["function"]["name"]: (j, t["function"]) for j, t in enumerate(tools or [])}
    tags = []
    for name in names:
        j, fn = by_name[name]
        tags.append({
            "type": "tag",
            "begin": CALL_BEGIN + json.dumps(name, ensure_ascii=False) + ARGS_FIELD,
            "content": {"type": "grammar", "grammar": arguments_grammar(fn.get("parameters"),
                                                                        f"tools[{j}].function.parameters")},
            "end": CALL_END,
        })
    fmt = {"type": "tags_with_separator", "tags": tags, "separator": CALL_SEPARATOR,
           "at_least_one": True, "stop_after_first": not parallel_tool_calls}
    return {"structural_tag": json.dumps({"type": "structural_tag", "format": fmt}, ensure_ascii=False)}


def arguments_grammar(parameters: Any, param: str) -> str:
    """EBNF of the compact JSON object a call's arguments must be (XGrammar's JSON-schema converter)."""
    import xgrammar
    from sglang.srt.constrained.json_schema_validation import UnsupportedJSONSchemaFeature, \
        validate_xgrammar_json_schema

    # OpenAI: omitted parameters define a function with an empty parameter list
    schema = {"type": "object", "properties": {}, "additionalProperties": False} if parameters is None else parameters
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        raise ApiError(f"'{param}' must be a JSON schema of type 'object' to force a call", param=param)
    try:
        validate_xgrammar_json_schema(schema)
        grammar = xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False,
                                                    separators=(", ", ": "), strict_mode=True)
    except (UnsupportedJSONSchemaFeature, RuntimeError, ValueError, TypeError) as e:
        raise ApiError(f"'{param}' cannot be enforced: {e}", param=param) from None
    return str(grammar)
