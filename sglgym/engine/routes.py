"""Token-in/token-out OpenAI routes mounted on SGLang's own FastAPI app (no proxy, no second hop).

`POST /v1/chat/completions` answers in the contract NeMo Gym's `vllm_model` server expects: the
message carries `prompt_token_ids`, `generation_token_ids`, `generation_log_probs` — exactly the ids the
engine saw and sampled — and `logprobs.content[j].token` is `token_id:N` on request. Generation goes
straight to SGLang's tokenizer manager with `input_ids`; nothing is re-tokenized from text.
`POST /tokenize` returns the ids the chat route would feed the engine (same on-policy fix).
SGLang's own chat route stays reachable at `/sglang/v1/chat/completions` (for side-by-side benches).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from fastapi.routing import APIRoute

from .body import read_json_body
from .prompt import PromptBuilder, turn_end_token_id
from .protocol import ApiError, ChatRequest, parse_chat_request, parse_messages, \
    parse_template_kwargs, parse_tools
from .responses import LogprobEntries, chat_response, prepend_continued_text
from .request_fields import choice_seed, required_prefix, sampling_extras, with_required_prefix
from .toolchoice import parse_tool_choice, tool_choice_sampling
from .streaming import ChoiceStream, TextDeltas, merge_streams, sse


logger = logging.getLogger(__name__)


@dataclass
class RouteOptions:
    """Opt-in checks a trainer wants: requests must sample like training does."""
    training_temperature: float | None = None
    training_top_p: float | None = None
    max_body_bytes: int = 32 << 20   # larger bodies get a 413 before they are read

    @property
    def enforce_sampling(self) -> bool:
        return self.training_temperature is not None or self.training_top_p is not None


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _error(e: ApiError) -> Response:
    return _json(e.body(), status=e.status)


class EngineRoutes:
    """Handlers bound to SGLang's tokenizer manager (looked up lazily: it exists once SGLang started)."""

    def __init__(self, options: RouteOptions):
        self.options = options
        self._builder: PromptBuilder | None = None
        self._entries: LogprobEntries | None = None
        self._max_token_chars: int | None = None
        self._warned_seed = False

    # --- SGLang state -------------------------------------------------------------------------
    @property
    def tm(self):
        from sglang.srt.entrypoints.http_server import get_global_state
        state = get_global_state()
        if state is None or state.tokenizer_manager is None:
            raise ApiError("the engine is not ready yet", status=503, type_="service_unavailable")
        return state.tokenizer_manager

    @property
    def builder(self) -> PromptBuilder:
        if self._builder is None:
            tm = self.tm
            eos = tm.tokenizer.eos_token_id
            if eos is None:
                ids = tm.model_config.hf_eos_token_id
                eos = min(ids) if ids else None
            # SGLGYM_PROMPT_CACHE_SIZE=0 turns the template cache off (to measure what it saves)
            self._builder = PromptBuilder(tm.tokenizer, turn_end_token_id(tm.tokenizer, eos),
                                          cache_size=int(os.environ.get("SGLGYM_PROMPT_CACHE_SIZE", "1024")))
        return self._builder

    def vocab_size(self) -> int:
        return int(self.tm.model_config.vocab_size)

    def context_len(self) -> int:
        return int(self.tm.context_len)

    def _server_arg(self, name: str):
        try:
            return self.tm.config_value(name)
        except Exception:
            return getattr(self.tm.server_args, name, None)

    # --- /tokenize ----------------------------------------------------------------------------
    async def tokenize(self, request: Request) -> Response:
        try:
            body = await self._body(request)
            if "messages" in body:   # mm_processor_kwargs (NeMo Gym >= 0.5) is accepted: no media here
                messages, carried = parse_messages(body.get("messages"), self.vocab_size())
                carried = with_required_prefix(messages, carried, required_prefix(body, self.vocab_size()))
                self._check_text_size(messages)
                ids = self.builder.build(messages, carried, parse_tools(body), parse_template_kwargs(body))
            elif isinstance(body.get("prompt"), str):
                add_special = body.get("add_special_tokens", True)
                ids = self.builder.tokenizer.encode(body["prompt"], add_special_tokens=bool(add_special))
            else:
                raise ApiError("provide 'messages' (a chat) or 'prompt' (a string)", param="messages")
            return _json({"tokens": ids, "count": len(ids), "max_model_len": self.context_len()})
        except ApiError as e:
            return _error(e)

    # --- /v1/chat/completions -----------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        try:
            body = await self._body(request)
            req = parse_chat_request(body, self.vocab_size())
            req.tool_choice, req.parallel_tool_calls = parse_tool_choice(body, req.tools)
            extras = sampling_extras(body, self.vocab_size())
            req.carried = with_required_prefix(req.messages, req.carried, required_prefix(body, self.vocab_size()))
            self._check_sampling(req)
            self._seed_policy(req)
            self._check_text_size(req.messages)
            prompt_ids = self.builder.build(req.messages, req.carried, req.tools, req.chat_template_kwargs,
                                            continue_final=req.continue_final_message)
            max_tokens = self._max_tokens(req, len(prompt_ids))
            if req.stream:
                return await self._stream(req, prompt_ids, max_tokens, extras, request, body)
            outputs = await asyncio.gather(*[
                self._generate(prompt_ids, req, max_tokens, i, request, extras) for i in range(req.n)
            ])
            if req.continue_final_message:  # the reply is the continued message: parse its text as a whole
                prepend_continued_text(req, outputs, self.builder.tokenizer)
            return _json(self._response(req, prompt_ids, outputs))
        except ApiError as e:
            return _error(e)

    async def _body(self, request: Request) -> dict:
        return await read_json_body(request, self.options.max_body_bytes)

    def _check_text_size(self, messages: list[dict]) -> None:
        # A token covers at most `max_token_chars` characters, so text longer than that many times the
        # context cannot fit: say so before spending seconds templating and tokenizing megabytes.
        chars = sum(len(m["content"] or "") + len(m.get("reasoning_content") or "") for m in messages)
        if chars > self.context_len() * self.max_token_chars:
            raise ApiError(f"This model's maximum context length is {self.context_len()} tokens. However, "
                           f"your messages hold {chars} characters, more than fits in it.", param="messages")

    @property
    def max_token_chars(self) -> int:
        if self._max_token_chars is None:
            self._max_token_chars = max(len(t) for t in self.builder.tokenizer.get_vocab())
        return self._max_token_chars

    @property
    def deterministic(self) -> bool:
        return bool(self._server_arg("enable_deterministic_inference"))

    @property
    def fingerprint(self) -> str:
        # OpenAI's field for "the backend's determinism-relevant configuration"
        return "sglgym-deterministic" if self.deterministic else "sglgym-seeds-ignored"

    def _choice_seed(self, req: ChatRequest, index: int) -> dict:
        return {"seed": choice_seed(req.seed, index)} if self.deterministic and req.seed is not None else {}

    def _seed_policy(self, req: ChatRequest) -> None:
        """Deterministic mode: an unseeded request gets a fresh random seed (SGLang would give every one
        seed 42: identical GRPO samples), returned per choice so the sample can be replayed. Otherwise
        SGLang ignores seeds: said once in the log and in every response's `system_fingerprint`."""
        if self.deterministic:
            if req.seed is None:
                req.seed = secrets.randbits(63)
        elif req.seed is not None and not self._warned_seed:
            self._warned_seed = True
            logger.warning("a request asked for seed=%s, but this server samples without seeds; start "
                           "`sglgym serve --deterministic` to make seeds hold", req.seed)

    def _check_sampling(self, req: ChatRequest) -> None:
        o = self.options
        if not o.enforce_sampling:
            return
        if o.training_temperature is not None and abs(req.temperature - o.training_temperature) > 1e-6:
            raise ApiError(f"'temperature' must equal the training temperature {o.training_temperature} "
                           f"(got {req.temperature}): off-policy sampling", param="temperature")
        if o.training_top_p is not None and abs(req.top_p - o.training_top_p) > 1e-6:
            raise ApiError(f"'top_p' must equal the training top_p {o.training_top_p} (got {req.top_p})",
                           param="top_p")
        if req.top_k not in (None, -1, 0):
            raise ApiError("'top_k' must be unset when sampling for training", param="top_k")

    def _max_tokens(self, req: ChatRequest, prompt_len: int) -> int:
        ctx = self.context_len()
        if prompt_len >= ctx:
            raise ApiError(f"This model's maximum context length is {ctx} tokens. However, your messages "
                           f"resulted in {prompt_len} tokens.", param="messages")
        room = ctx - prompt_len
        if req.max_tokens is None:
            return room
        if req.max_tokens > room:
            raise ApiError(f"This model's maximum context length is {ctx} tokens. However, you requested "
                           f"{prompt_len + req.max_tokens} tokens ({prompt_len} in the messages, "
                           f"{req.max_tokens} in the completion). Please reduce the length of the messages "
                           "or max_tokens.", param="max_tokens")
        return req.max_tokens

    async def _generate(self, prompt_ids: list[int], req: ChatRequest, max_tokens: int, index: int,
                        request: Request, extras: dict) -> dict:
        obj = self._request_obj(prompt_ids, req, max_tokens, index, extras, stream=False)
        try:
            return await self.tm.generate_request(obj, request).__anext__()
        except ValueError as e:  # SGLang's own request validation
            raise ApiError(str(e), param=None) from None

    def _request_obj(self, prompt_ids: list[int], req: ChatRequest, max_tokens: int, index: int, extras: dict,
                     stream: bool):
        from sglang.srt.managers.io_struct import GenerateReqInput

        sampling = {
            "temperature": req.temperature, "top_p": req.top_p, "min_p": req.min_p,
            "max_new_tokens": max_tokens, "stop": req.stop or None,
            "stop_token_ids": self._stop_ids(req) or None,
            "frequency_penalty": req.frequency_penalty, "presence_penalty": req.presence_penalty,
            "repetition_penalty": req.repetition_penalty, "skip_special_tokens": req.skip_special_tokens,
            "ignore_eos": req.ignore_eos,
            **tool_choice_sampling(req.tools, req.tool_choice, req.parallel_tool_calls,   # required / named
                                   self._server_arg("tool_call_parser"), self._server_arg("grammar_backend")),
        }
        if req.top_k not in (None, 0):
            sampling["top_k"] = req.top_k
        if req.seed is not None:
            sampling["sampling_seed"] = choice_seed(req.seed, index)
        sampling.update(extras)
        return GenerateReqInput(
            input_ids=list(prompt_ids), sampling_params=sampling, return_logprob=True,
            logprob_start_len=-1, top_logprobs_num=req.top_logprobs, stream=stream,
        )

    def _stop_ids(self, req: ChatRequest) -> list[int]:
        # a template whose turn end is not the EOS (Gemma's <end_of_turn>) must still end the turn there
        turn_end = self.builder.eos_token_id
        extra = [turn_end] if turn_end is not None and turn_end != self.builder.tokenizer.eos_token_id else []
        return [*req.stop_token_ids, *extra]

    # --- streaming ----------------------------------------------------------------------------
    async def _stream(self, req: ChatRequest, prompt_ids: list[int], max_tokens: int, extras: dict,
                      request: Request, body: dict) -> StreamingResponse:
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError("'stream_options' must be an object", param="stream_options")
        include_usage = bool(options.get("include_usage"))
        tools = req.tools if req.tool_choice != "none" else None
        choices, generators = [], []
        for i in range(req.n):
            deltas = TextDeltas(tools, self._server_arg("tool_call_parser"), self._server_arg("reasoning_parser"))
            choices.append(ChoiceStream(i, req, deltas, lambda tid, lp, top: self.entries.entry(
                tid, lp, top, req.return_tokens_as_token_ids)))
            obj = self._request_obj(prompt_ids, req, max_tokens, i, extras, stream=True)
            generators.append(self.tm.generate_request(obj, request))
        firsts = []
        for gen in generators:   # the first output before any byte is sent: SGLang's validation is a 400
            try:
                firsts.append(await gen.__anext__())
            except ValueError as e:
                raise ApiError(str(e), param=None) from None
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": req.model or self._server_arg("served_model_name"),
                "system_fingerprint": self.fingerprint}

        async def choice_chunks(cs: ChoiceStream, first: dict, gen):
            yield cs.chunk(first, prompt_ids)
            async for out in gen:
                yield cs.chunk(out, prompt_ids)

        async def events():
            try:
                streams = [choice_chunks(c, f, g) for c, f, g in zip(choices, firsts, generators)]
                # one choice (the common case) needs no merging: no queue, no task per chunk
                async for chunk_choices in (streams[0] if len(streams) == 1 else merge_streams(streams)):
                    for choice in chunk_choices:   # one choice per chunk, as OpenAI streams
                        yield sse({**head, "choices": [choice]})
            except ValueError as e:
                yield sse(ApiError(str(e)).body())
            if include_usage:
                completion = sum(c.sent_tokens for c in choices)
                yield sse({**head, "choices": [], "usage": {
                    "prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                    "total_tokens": len(prompt_ids) + completion}})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    # --- response -----------------------------------------------------------------------------
    def _response(self, req: ChatRequest, prompt_ids: list[int], outputs: list[dict]) -> dict:
        return chat_response(req, prompt_ids, outputs, self.entries, self._server_arg("tool_call_parser"),
                             self._server_arg("reasoning_parser"), req.model or self._server_arg("served_model_name"),
                             self.fingerprint, lambda index: self._choice_seed(req, index))

    @property
    def entries(self) -> LogprobEntries:
        if self._entries is None:
            self._entries = LogprobEntries(self.builder.tokenizer)
        return self._entries


def install_routes(app: FastAPI, options: RouteOptions) -> EngineRoutes:
    """Mount our routes in front of SGLang's (first match wins) and keep SGLang's chat route reachable."""
    handlers = EngineRoutes(options)
    for route in list(app.router.routes):
        if isinstance(route, APIRoute) and route.path == "/v1/chat/completions":
            app.add_api_route("/sglang/v1/chat/completions", route.endpoint, methods=["POST"],
                              dependencies=route.dependencies)
    ours = [
        APIRoute("/v1/chat/completions", handlers.chat_completions, methods=["POST"]),
        APIRoute("/tokenize", handlers.tokenize, methods=["POST"]),
        APIRoute("/v1/tokenize", handlers.tokenize, methods=["POST"]),
    ]
    app.router.routes[:0] = ours
    return handlers
