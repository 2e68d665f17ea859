"""The agent loop of one rollout, in-process: call the model, run its tool calls against the resources
server, feed the results back, until the model calls no tool (or the env ends the episode) or max turns.

Every assistant message sent back to the engine carries the ids of its turn (`prompt_token_ids`,
`generation_token_ids`, `generation_log_probs`), so the engine builds the next prompt from the ids it
really saw and sampled; `TokenTracker` checks that each prompt extends everything seen so far.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from .engines import EnginePool
from .env import Env
from .errors import EnvProtocolError, RolloutError
from .responses import (assistant_items, build_response, sampling_from_params, to_chat_messages, to_chat_tools,
                        tool_output_item, user_item)
from .samples import Sample
from .seeds import rollout_seed
from .tokens import ContiguityError, TokenTracker
from .transport import TransportError, post_json
from .turn import CARRIED, model_turn
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")


@dataclass
class LoopOptions:
    sampling: dict = field(default_factory=lambda: {"temperature": 1.0, "top_p": 1.0, "max_tokens": 64})
    engine_timeout_s: float = 120.0
    retries: int = 2
    decode: Callable[[list[int]], str] | None = None   # only used to make contiguity diffs readable
    continue_aborted: int = 0   # continue a turn an in-flight weight update aborted, this often (0: fail it)


@dataclass
class RolloutJob:
    env: Env
    row: dict
    group_id: int
    prompt_index: int
    sample_index: int


async def _env_call(client: aiohttp.ClientSession, env: Env, path: str, body: dict, cookies: dict,
                    timeout_s: float, retries: int, stage: str) -> dict:
    """POST to the resources server; the reply must be a JSON object (else a clear protocol error)."""
    url = f"{env.url}/{path.lstrip('/')}"
    try:
        reply = await post_json(client, url, body, timeout_s=timeout_s, retries=retries, cookies=cookies)
    except TransportError as e:
        raise RolloutError(stage, f"env {env.name!r}: {e}", url) from None
    cookies.update(reply.cookies)
    if not reply.ok:
        raise RolloutError(stage, f"env {env.name!r} {path} answered HTTP {reply.status}: {reply.text[:500]}", url)
    if reply.body is None:
        raise EnvProtocolError(f"env {env.name!r} {path} answered non-JSON (HTTP {reply.status}): "
                               f"{reply.text[:200]!r}", url)
    if not isinstance(reply.body, dict):
        raise EnvProtocolError(f"env {env.name!r} {path} answered {type(reply.body).__name__}, "
                               "expected a JSON object", url)
    return reply.body


async def _call_tool(client: aiohttp.ClientSession, env: Env, call: dict, cookies: dict, retries: int) -> str:
    """The tool's output as text. Model mistakes (bad JSON, unknown tool, a 4xx) become the output, as NeMo
    Gym's agents do; an unreachable server or a 5xx after the retries fails the rollout (stage `tool`)."""
    fn = call.get("function") or {}
    name, raw_args = fn.get("name") or "", fn.get("arguments") or "{}"
    if not _TOOL_NAME.match(name):
        return json.dumps({"error": f"invalid tool name {name!r}"})
    try:
        args = json.loads(raw_args) if isinstance(raw_args, str) else raw_args
    except json.JSONDecodeError as e:
        return json.dumps({"error": f"Invalid tool call arguments: {e!r}"})
    if not isinstance(args, dict):
        return json.dumps({"error": "tool call arguments must be a JSON object"})
    url = f"{env.url}/{name}"
    try:
        reply = await post_json(client, url, args, timeout_s=env.config.agent.tool_timeout_s, retries=retries,
                                cookies=cookies)
    except TransportError as e:
        raise RolloutError("tool", f"env {env.name!r}: {e}", url) from None
    cookies.update(reply.cookies)
    if reply.status >= 500:   # the server broke (after the retries): not something the model did
        raise RolloutError("tool", f"env {env.name!r} tool {name!r} answered HTTP {reply.status}: {reply.text[:500]}",
                           url)
    return reply.text


def _carried_message(msg: dict, carry_ids: bool) -> dict:
    out = {"role": "assistant", "content": msg.get("content")}
    if msg.get("tool_calls"):
        out["tool_calls"] = [{"id": c.get("id"), "type": "function",
                              "function": {"name": c["function"]["name"],
                                           "arguments": c["function"].get("arguments", "{}")}}
                             for c in msg["tool_calls"]]
    if msg.get("reasoning_content"):
        out["reasoning_content"] = msg["reasoning_content"]
    if carry_ids:
        for k in CARRIED:
            out[k] = msg[k]
    return out


async def run_rollout(job: RolloutJob, engine_url: str, pool: EnginePool, engine_client: aiohttp.ClientSession,
                      env_client: aiohttp.ClientSession, opts: LoopOptions) -> Sample:
    if job.env.config.type == "nemo_gym":
        return await run_via_nemo_gym_agent(job, env_client, opts)
    env, row, agent = job.env, job.row, job.env.config.agent
    t0 = time.monotonic()
    rollout_id = f"g{job.group_id}-s{job.sample_index}-{uuid.uuid4().hex[:8]}"
    params = row.get("responses_create_params")
    if not isinstance(params, dict) or "input" not in params:
        raise RolloutError("row", "row has no responses_create_params.input")
    messages = to_chat_messages(params["input"])
    tools = to_chat_tools(params.get("tools"))
    sampling = {**opts.sampling, **sampling_from_params(params)}
    cookies: dict = {}
    await _env_call(env_client, env, "/seed_session", row, cookies, agent.env_timeout_s, opts.retries, "seed_session")

    tracker = TokenTracker(opts.decode, split_on_break=not agent.carry_token_ids)
    output: list[dict] = []
    finish_reasons: list[str] = []
    tool_calls_made = 0
    truncated, stop_reason = False, "done"
    continuations = 0
    for turn in range(agent.max_turns):
        body = {"model": pool.model, "messages": messages, **sampling}
        if tools:
            body["tools"] = tools
        if body.get("seed") is not None:  # distinct but reproducible per sample and turn
            body["seed"] = rollout_seed(body["seed"], job.prompt_index, job.sample_index, turn)
        turn_reply = await model_turn(engine_client, engine_url, body, opts, pool.headers())
        if turn_reply is None:      # the conversation no longer fits: a truncated rollout
            truncated, stop_reason = True, "context_length"
            break
        choice, msg = turn_reply.choice, turn_reply.message
        continuations += turn_reply.continuations
        try:
            tracker.add_turn(msg["prompt_token_ids"], msg["generation_token_ids"], msg["generation_log_probs"],
                             turn_reply.versions)
        except ContiguityError as e:
            raise RolloutError("contiguity", str(e), engine_url) from None
        messages.append(_carried_message(msg, agent.carry_token_ids))
        tool_calls = msg.get("tool_calls") or []
        output += assistant_items(msg.get("content"), tool_calls)
        finish_reasons.append(choice.get("finish_reason") or "stop")
        if finish_reasons[-1] == "length" and not (agent.continue_on_length and agent.user_turns):
            truncated, stop_reason = True, "max_tokens"   # the turn is unfinished: so is the episode
            break
        if tool_calls:
            for call in tool_calls:
                result = await _call_tool(env_client, env, call, cookies, opts.retries)
                tool_calls_made += 1
                messages.append({"role": "tool", "tool_call_id": call.get("id"), "content": result})
                output.append(tool_output_item(call.get("id"), result))
            continue
        if agent.user_turns:
            step = await _env_call(env_client, env, "/step", {**row, "response": build_response(output, pool.model, params)},
                                   cookies, agent.env_timeout_s, opts.retries, "step")
            if "terminated" not in step:
                raise EnvProtocolError(f"env {env.name!r} /step reply has no 'terminated' field "
                                       f"(keys: {sorted(step)})", env.url)
            observation = step.get("observation")
            if step["terminated"] or not observation:
                break
            messages.append({"role": "user", "content": str(observation)})
            output.append(user_item(str(observation)))
            continue
        break
    else:  # every turn was used and the episode still wanted more
        truncated, stop_reason = True, "max_turns"

    if tracker.num_turns == 0:
        raise RolloutError("engine", "the first turn already exceeds the context length", engine_url)
    response = build_response(output, pool.model, params)
    verdict = await _env_call(env_client, env, "/verify", {**row, "response": response}, cookies,
                              agent.env_timeout_s, opts.retries, "verify")
    if "reward" not in verdict:
        raise EnvProtocolError(f"env {env.name!r} /verify reply has no 'reward' field "
                               f"(keys: {sorted(verdict)[:12]})", env.url)
    reward = verdict["reward"]
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        raise EnvProtocolError(f"env {env.name!r} /verify 'reward' must be a number, got {reward!r}", env.url)
    extra = {k: v for k, v in verdict.items() if k not in row and k not in ("response", "reward")}
    return tracker.to_sample(
        reward=float(reward), group_id=job.group_id, prompt_index=job.prompt_index, truncated=truncated,
        env=env.name, engine_url=engine_url,
        meta={"rollout_id": rollout_id, "sample_index": job.sample_index, "stop_reason": stop_reason,
              "finish_reasons": finish_reasons, "tool_calls": tool_calls_made,
              "continued_generations": continuations,
              "elapsed_s": round(time.monotonic() - t0, 4), "verify": extra},
    )


async def run_via_nemo_gym_agent(job: RolloutJob, client: aiohttp.ClientSession, opts: LoopOptions) -> Sample:
    """A rollout run by a NeMo Gym agent server (`POST /run`): it calls the model server (which calls our
    engine) and the resources server itself; the ids come back on the output items."""
    from .nemo_gym import row_for_run, turns_from_output

    env, t0 = job.env, time.monotonic()
    timeout = env.config.agent.env_timeout_s + opts.engine_timeout_s * env.config.agent.max_turns
    result = await _env_call(client, env, "/run", row_for_run(job.row, opts.sampling), {}, timeout, 0, "run")
    if "reward" not in result or isinstance(result["reward"], bool) \
            or not isinstance(result["reward"], (int, float)):
        raise EnvProtocolError(f"env {env.name!r} /run reply has no numeric 'reward' (keys: {sorted(result)[:12]})",
                               env.url)
    output = (result.get("response") or {}).get("output") or []
    turns = turns_from_output(output)
    incomplete = (result.get("response") or {}).get("incomplete_details")
    if not turns and (incomplete or {}).get("reason") == "max_output_tokens":
        # NeMo Gym's vllm_model answers an engine's context-length 400 with an empty "length" completion
        raise RolloutError("context", f"env {env.name!r}: the engine generated nothing for this row: its prompt "
                           "(plus max_tokens) is longer than the engine's context; raise the engine's "
                           "--context-length or lower max_tokens", env.url)
    if not turns:
        raise EnvProtocolError(f"env {env.name!r} /run output carries no generation_token_ids: is the model "
                               "server configured with return_token_id_information: true?", env.url)
    # NeMo Gym's agent builds each turn's prompt itself: where it drops part of the history (an empty
    # generation's message, a template that removes earlier reasoning) the rollout is split there
    tracker = TokenTracker(opts.decode, split_on_break=True)
    for i, (prompt, gen, lps) in enumerate(turns):
        try:
            tracker.add_turn(prompt, gen, lps)
        except ContiguityError as e:
            raise RolloutError("contiguity", str(e), env.url) from None
    return tracker.to_sample(
        reward=float(result["reward"]), group_id=job.group_id, prompt_index=job.prompt_index,
        # with several replicas NeMo Gym's model server picks one per rollout and does not say which
        truncated=bool(incomplete), env=env.name, engine_url=env.engine_urls[0] if len(env.engine_urls) == 1 else "",
        meta={"sample_index": job.sample_index, "stop_reason": "max_tokens" if incomplete else "done",
              "elapsed_s": round(time.monotonic() - t0, 4), "agent_url": env.url,
              "tool_calls": sum(1 for o in output if o.get("type") == "function_call")},
    )
