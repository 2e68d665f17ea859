"""Conversions between NeMo Gym's Responses API shapes and the chat shapes our engine route speaks.

Rows carry `responses_create_params` (Responses API: `input` items, flat function tools); the engine
takes chat messages and `{"type": "function", "function": {...}}` tools. Verifiers get the rollout back
as a Responses API object whose `output` lists messages, function calls and their outputs.
"""

from __future__ import annotations

import json
import time
import uuid


def _text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))


def to_chat_tools(tools: list[dict] | None) -> list[dict] | None:
    if not tools:
        return None
    out = []
    for t in tools:
        if "function" in t:            # already chat-shaped
            out.append(t)
        elif t.get("type", "function") == "function":
            fn = {k: t[k] for k in ("name", "description", "parameters") if k in t}
            out.append({"type": "function", "function": fn})
    return out or None


def to_chat_messages(input_items) -> list[dict]:
    """Responses API `input` (a string or items) -> chat messages."""
    if isinstance(input_items, str):
        return [{"role": "user", "content": input_items}]
    messages: list[dict] = []
    for item in input_items or []:
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role", "user")
            messages.append({"role": "system" if role == "developer" else role,
                             "content": _text(item.get("content"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id") or item.get("id"), "type": "function",
                    "function": {"name": item["name"], "arguments": item.get("arguments", "{}")}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": _text(item.get("output"))})
        elif kind == "reasoning":
            continue  # summaries are not replayed
        else:
            raise ValueError(f"unsupported input item type {kind!r}")
    return messages


def sampling_from_params(params: dict) -> dict:
    """Sampling fields a row may set in responses_create_params (they override the batch defaults)."""
    out = {}
    if params.get("temperature") is not None:
        out["temperature"] = params["temperature"]
    if params.get("top_p") is not None:
        out["top_p"] = params["top_p"]
    if params.get("max_output_tokens") is not None:
        out["max_tokens"] = params["max_output_tokens"]
    return out


def assistant_items(content: str | None, tool_calls: list[dict] | None) -> list[dict]:
    items = []
    if content:
        items.append({"id": f"msg_{uuid.uuid4().hex[:16]}", "type": "message", "role": "assistant",
                      "status": "completed",
                      "content": [{"type": "output_text", "text": content, "annotations": []}]})
    for call in tool_calls or []:
        fn = call["function"]
        args = fn.get("arguments", "{}")
        items.append({"id": f"fc_{uuid.uuid4().hex[:16]}", "type": "function_call", "status": "completed",
                      "call_id": call.get("id"), "name": fn["name"],
                      "arguments": args if isinstance(args, str) else json.dumps(args)})
    if not items:  # an empty reply is still a turn
        items.append({"id": f"msg_{uuid.uuid4().hex[:16]}", "type": "message", "role": "assistant",
                      "status": "completed", "content": [{"type": "output_text", "text": "", "annotations": []}]})
    return items


def tool_output_item(call_id: str | None, output: str) -> dict:
    return {"type": "function_call_output", "call_id": call_id, "output": output}


def user_item(text: str) -> dict:
    return {"type": "message", "role": "user", "content": text}


def build_response(output: list[dict], model: str, params: dict) -> dict:
    """A Responses API object with the rollout's output items (what /verify reads)."""
    return {
        "id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()),
        "model": model, "status": "completed", "output": output,
        "parallel_tool_calls": True, "tool_choice": params.get("tool_choice", "auto"),
        "tools": params.get("tools") or [],
    }
