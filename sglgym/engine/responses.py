"""Chat completion bodies from SGLang outputs: the message with its token ids, OpenAI logprob entries
(`token_id:N` on request), and content / reasoning / tool calls split by SGLang's own parsers."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from .protocol import ChatRequest

FINISH = {"length": "length", "abort": "abort"}   # anything else SGLang reports ends the turn: "stop"


class LogprobEntries:
    """OpenAI `logprobs.content` entries; token strings memoised per id (this is per-token work)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._tokens: dict[tuple[int, bool], tuple[str, list[int]]] = {}

    def _token(self, token_id: int, as_id: bool) -> tuple[str, list[int]]:
        key = (token_id, as_id)
        hit = self._tokens.get(key)
        if hit is None:
            text = f"token_id:{token_id}" if as_id else self.tokenizer.decode([token_id])
            hit = self._tokens[key] = (text, list(text.encode()))
        return hit

    def entry(self, token_id: int, logprob: float, top: list | None, as_id: bool) -> dict:
        token, token_bytes = self._token(token_id, as_id)
        entry = {"token": token, "logprob": logprob, "bytes": token_bytes, "top_logprobs": []}
        for t in top or []:
            s, s_bytes = self._token(int(t[1]), as_id)
            entry["top_logprobs"].append({"token": s, "logprob": float(t[0]), "bytes": s_bytes})
        return entry


def chat_response(req: ChatRequest, prompt_ids: list[int], outputs: list[dict], entries: LogprobEntries,
                  tool_parser: str | None, reasoning_parser: str | None, model: str | None, fingerprint: str,
                  choice_extra: Callable[[int], dict]) -> dict:
    choices, completion_tokens = [], 0
    for index, out in enumerate(outputs):
        meta = out["meta_info"]
        token_lps = meta["output_token_logprobs"]  # [(logprob, token_id, text)] for every output id
        gen_ids = [int(t[1]) for t in token_lps]
        gen_lps = [float(t[0]) for t in token_lps]
        completion_tokens += len(gen_ids)
        content, reasoning, tool_calls = split_generated_text(
            out["text"], req.tools if req.tool_choice != "none" else None, tool_parser, reasoning_parser)
        finish = FINISH.get((meta.get("finish_reason") or {}).get("type"), "stop")
        if tool_calls and finish == "stop":
            finish = "tool_calls"
        message = {
            "role": "assistant", "content": content, "tool_calls": tool_calls or None,
            "reasoning_content": reasoning,
            "prompt_token_ids": prompt_ids, "generation_token_ids": gen_ids, "generation_log_probs": gen_lps,
        }
        logprobs = None
        if req.logprobs:
            top = meta.get("output_top_logprobs") if req.top_logprobs else None
            logprobs = {"content": [entries.entry(tid, lp, top[j] if top else None, req.return_tokens_as_token_ids)
                                    for j, (tid, lp) in enumerate(zip(gen_ids, gen_lps))]}
        choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish,
                        "matched_stop": (meta.get("finish_reason") or {}).get("matched"),
                        **weight_versions(meta, len(gen_ids)), **choice_extra(index)})
    cached = max((int(o["meta_info"].get("cached_tokens") or 0) for o in outputs), default=0)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model, "choices": choices, "system_fingerprint": fingerprint,
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                  "total_tokens": len(prompt_ids) + completion_tokens,
                  "prompt_tokens_details": {"cached_tokens": cached}},   # prefix-cache hits (OpenAI's field)
    }


def weight_versions(meta: dict, num_generated: int) -> dict:
    """The weights that sampled the generation: `weight_version` (at its end) and `weight_versions`, spans
    [start, end) over generation_token_ids with the version of each (several when a weight update came
    while the request was in flight: SGLang records where)."""
    version = meta.get("weight_version")
    spans = [dict(s) for s in meta.get("weight_versions") or []] or [{"version": version, "start": 0, "end": 0}]
    spans[-1]["end"] = num_generated   # SGLang's count may leave out a final stop token we return
    return {"weight_version": version, "weight_versions": spans}


def prepend_continued_text(req: ChatRequest, outputs: list[dict], tokenizer) -> None:
    """With `continue_final_message` the reply is the whole continued message: its text from the start."""
    last = req.carried[-1] if req.carried and req.carried[-1].message_index == len(req.messages) - 1 else None
    for out in outputs:
        if last is not None:   # decoded as one sequence: a character split over the cut stays whole
            new_ids = [int(t[1]) for t in out["meta_info"]["output_token_logprobs"]]
            out["text"] = tokenizer.decode(last.generation_token_ids + new_ids, skip_special_tokens=req.skip_special_tokens)
        else:
            start = req.messages[-1].get("content")
            out["text"] = (start if isinstance(start, str) else "") + out["text"]


def split_generated_text(text: str, tools: list[dict] | None, tool_parser: str | None,
                         reasoning_parser: str | None) -> tuple[str | None, str | None, list[dict]]:
    """(content, reasoning, tool_calls) of generated text, with SGLang's own parsers."""
    reasoning = None
    if reasoning_parser:
        from sglang.srt.parser.reasoning_parser import ReasoningParser
        reasoning, text = ReasoningParser(model_type=reasoning_parser, stream_reasoning=False).parse_non_stream(text)
    tool_calls = []
    if tools and tool_parser:
        from sglang.srt.entrypoints.openai.protocol import Tool
        from sglang.srt.function_call.function_call_parser import FunctionCallParser
        parser = FunctionCallParser([Tool(**t) for t in tools], tool_parser)
        if parser.has_tool_call(text):
            try:
                text, calls = parser.parse_non_stream(text)
            except Exception:  # a malformed call stays plain content; the env sees what the model wrote
                calls = []
            for j, call in enumerate(calls):
                tool_calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "index": j,
                                   "function": {"name": call.name, "arguments": call.parameters}})
    return (text or None), reasoning, tool_calls
