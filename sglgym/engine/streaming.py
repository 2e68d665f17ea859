"""Streaming chat completions (SSE) that keep the token-id contract.

Each choice streams OpenAI chunk deltas: content (or reasoning / tool-call deltas, through SGLang's own
streaming parsers), and `logprobs.content` for the new tokens (`token_id:N` on request). The choice's
last chunk carries the same `prompt_token_ids`, `generation_token_ids` and `generation_log_probs` as the
non-streaming message, so a streaming client can train on exactly what was sampled, and the same
`weight_version` / `weight_versions` (which weights sampled which tokens).

SGLang streams cumulative outputs (text and logprobs so far); a `ChoiceStream` keeps how much of each it
has already sent and emits the rest.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import orjson

from .protocol import ChatRequest
from .responses import FINISH, weight_versions


# Characters that JSON leaves raw but that line readers built on str.splitlines (httpx's iter_lines, among
# others) take for a line end, cutting an event in two; a random model does write them.
LINE_BREAKERS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else orjson.dumps(payload).decode().translate(LINE_BREAKERS)
    return f"data: {data}\n\n".encode()


class TextDeltas:
    """Splits a choice's new text into content / reasoning / tool-call deltas with SGLang's parsers."""

    def __init__(self, tools: list[dict] | None, tool_parser: str | None, reasoning_parser: str | None):
        self.reasoning = None
        if reasoning_parser:
            from sglang.srt.parser.reasoning_parser import ReasoningParser
            self.reasoning = ReasoningParser(model_type=reasoning_parser, stream_reasoning=True)
        self.calls = None
        if tools and tool_parser:
            from sglang.srt.entrypoints.openai.protocol import Tool
            from sglang.srt.function_call.function_call_parser import FunctionCallParser
            self.calls = FunctionCallParser([Tool(**t) for t in tools], tool_parser)
        self.call_ids: dict[int, str] = {}

    def delta(self, text: str) -> dict:
        out: dict = {}
        if self.reasoning is not None and text:
            reasoning, text = self.reasoning.parse_stream_chunk(text)
            if reasoning:
                out["reasoning_content"] = reasoning
        if self.calls is not None and text:
            text, items = self.calls.parse_stream_chunk(text)
            if items:
                out["tool_calls"] = [self._call_delta(item) for item in items]
        if text:
            out["content"] = text
        return out

    def flush(self) -> dict:
        """What a parser held back waiting for a marker that can no longer come."""
        if self.calls is None:
            return {}
        text, items = self.calls.parse_stream_end()
        out: dict = {"content": text} if text else {}
        if items:
            out["tool_calls"] = [self._call_delta(item) for item in items]
        return out

    def _call_delta(self, item) -> dict:
        delta: dict = {"index": item.tool_index, "function": {"arguments": item.parameters or ""}}
        if item.name:
            self.call_ids[item.tool_index] = f"call_{uuid.uuid4().hex[:24]}"
            delta.update(id=self.call_ids[item.tool_index], type="function")
            delta["function"]["name"] = item.name
        return delta


class ChoiceStream:
    """One choice: cumulative SGLang outputs in, chunk choices out."""

    def __init__(self, index: int, req: ChatRequest, deltas: TextDeltas,
                 logprob_entry: Callable[[int, float, list | None], dict]):
        self.index, self.req, self.deltas, self.logprob_entry = index, req, deltas, logprob_entry
        self.sent_text = 0
        self.sent_tokens = 0
        self.started = False
        self.saw_call = False

    def chunk(self, out: dict, prompt_ids: list[int]) -> list[dict]:
        """Chunk choices for one SGLang output (the last one also closes the choice)."""
        meta = out["meta_info"]
        token_lps = meta.get("output_token_logprobs") or []
        new = token_lps[self.sent_tokens:]
        top = (meta.get("output_top_logprobs") or [])[self.sent_tokens:] if self.req.top_logprobs else None
        self.sent_tokens = len(token_lps)
        text = out.get("text") or ""
        delta = self.deltas.delta(text[self.sent_text:])
        self.sent_text = len(text)
        finish = meta.get("finish_reason")
        choices = []
        if not self.started:
            delta = {"role": "assistant", **({"content": ""} if not delta else {}), **delta}
            self.started = True
        if finish is not None:
            tail = self.deltas.flush()
            delta = _merge(delta, tail)
        self.saw_call = self.saw_call or bool(delta.get("tool_calls"))
        logprobs = None
        if self.req.logprobs:
            logprobs = {"content": [self.logprob_entry(int(t[1]), float(t[0]), top[j] if top else None)
                                    for j, t in enumerate(new)]}
        if delta or (logprobs and logprobs["content"]):
            choices.append({"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": None})
        if finish is not None:
            choices.append(self._close(meta, prompt_ids, token_lps))
        return choices

    def _close(self, meta: dict, prompt_ids: list[int], token_lps: list) -> dict:
        finish = meta["finish_reason"]
        reason = FINISH.get(finish.get("type"), "stop")
        if reason == "stop" and self.saw_call:
            reason = "tool_calls"
        bundle = {"prompt_token_ids": prompt_ids, "generation_token_ids": [int(t[1]) for t in token_lps],
                  "generation_log_probs": [float(t[0]) for t in token_lps]}
        return {"index": self.index, "delta": bundle, "logprobs": None, "finish_reason": reason,
                "matched_stop": finish.get("matched"), **weight_versions(meta, len(token_lps))}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        if key == "content":
            out["content"] = (out.get("content") or "") + value
        elif key == "tool_calls":
            out["tool_calls"] = [*out.get("tool_calls", []), *value]
    return out


async def merge_streams(streams: list[AsyncIterator[list[dict]]]) -> AsyncIterator[list[dict]]:
    """Interleave the chunk lists of n choices as they come (one generator per choice)."""
    import asyncio

    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream):
        try:
            async for item in stream:
                await queue.put(item)
        except BaseException as e:  # surfaced to the consumer, which stops the others
            await queue.put(e)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
