"""`sglgym bench`: output tokens/s and request latency of sglgym's chat route, side by side with SGLang.

In one run, with the same prompts, sampling settings and concurrency, it measures
  (a) sglgym   POST /v1/chat/completions  (logprobs, return_tokens_as_token_ids: ids + logprobs in the message)
  (b) SGLang   POST /generate             (the same prompt ids from /tokenize, return_logprob)
  (c) SGLang   POST /sglang/v1/chat/completions (SGLang's own OpenAI chat route, logprobs)
  (d) sglgym   POST /v1/chat/completions with stream=true (SSE, token-id logprobs, closing bundle)
over a concurrency sweep; per level: a warm-up round per route (not counted), then `--repetitions`
rounds per route, interleaved (route order rotates every repetition), and the median is reported.
Each of the N concurrent workers has its own httpx client with one keep-alive connection (N in all).

`--load` instead runs N concurrent chat requests through (a) for a fixed time, then checks health.

Without `--base-url` it starts `sglgym serve` (the tiny model; a subprocess in its own process group,
killed by PID at the end). With `--base-url` it targets a running server (loopback), e.g. a GPU one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import orjson

from .client import ROUTE_PATHS, ROUTES, Prompt, RoundResult, Sampling, WorkerClients, make_chats, \
    make_client, ms, percentile, run_round, send, tokenize_prompts
from .cpu import ROLES, CpuMeter, ServerProcesses
from .report import REPO, device_tag, format_table, machine_info, plot
from sglgym.procs import ServerProcess, free_port, start_process, stop_process, wait_healthy

RESULTS_DIR = REPO / "bench" / "results" if (REPO / "bench" / "results").is_dir() else Path.cwd()
# 256 x (prompt + 64 tokens) fit in the KV pool; the scheduler sleeps between rounds instead of spinning a core.
DEFAULT_SERVE_ARGS = "--max-total-tokens 65536 --sleep-on-idle"
# A CPU server gets single-threaded torch unless the caller set OMP_NUM_THREADS: on a small shared machine, torch's
# OpenMP threads competing with the HTTP process, the client and other tenants made rounds swing 10x.
CPU_SERVER_ENV = {"OMP_NUM_THREADS": "1"}
TARGETS = {"a_over_b_min": 0.97, "a_over_b_at_concurrency": 64, "a_over_c_min": 1.0, "d_over_a_min": 0.95}
START_TIMEOUT_S = 600.0


@dataclass
class BenchConfig:
    base_url: str | None = None
    api_key: str | None = None
    serve_args: str = DEFAULT_SERVE_ARGS
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 64, 256])
    repetitions: int = 5
    requests_per_worker: int = 6     # a round sends max(concurrency * this, min_requests) requests ...
    min_requests: int = 96   # long enough rounds at low concurrency (32 swung +-8% at concurrency 1)
    round_time_limit_s: float = 60.0  # ... or stops sending after this many seconds
    prompts: int = 32
    sampling: Sampling = field(default_factory=Sampling)
    request_timeout_s: float = 600.0
    server_pid: int | None = None    # with --base-url: the server's main PID, to charge routes their CPU
    load: bool = False
    load_concurrency: int = 256
    load_duration_s: float = 60.0
    out: Path | None = None
    plot: bool = True


# --- server -----------------------------------------------------------------------------------
@dataclass
class Server:
    base_url: str
    process: ServerProcess | None = None  # None: a server we did not start
    env: dict[str, str] = field(default_factory=dict)  # what the bench set in the server's environment
    processes: ServerProcesses | None = None  # for CPU accounting (local servers only)

    def meter(self) -> CpuMeter:
        return CpuMeter(self.processes)


def start_server(serve_args: str, api_key: str | None, cpu: bool) -> Server:
    port = free_port()
    env_set = {k: v for k, v in CPU_SERVER_ENV.items() if k not in os.environ} if cpu else {}
    cmd = [sys.executable, "-m", "sglgym.cli", "serve", "--port", str(port), "--log-level", "warning",
           *shlex.split(serve_args), *(["--api-key", api_key] if api_key else [])]
    proc = start_process("bench-serve", cmd, f"http://127.0.0.1:{port}", env={**os.environ, **env_set})
    print(f"[bench] started: {' '.join(f'{k}={v}' for k, v in env_set.items())} {shlex.join(cmd)}  "
          f"(log: {proc.log_path})", flush=True)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    wait_healthy(proc, START_TIMEOUT_S, headers=headers)   # stops it and raises on exit / timeout
    return Server(proc.url, proc, env=env_set, processes=ServerProcesses.find(proc.pid))


def stop_server(server: Server) -> None:
    """Kill the process tree of the server we started (scheduler and detokenizer included), by PID."""
    if server.process is not None:
        stop_process(server.process, grace_s=20)


def server_info(base_url: str, api_key: str | None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        info = httpx.get(f"{base_url}/server_info", headers=headers, timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return {}
    keys = ("version", "model_path", "served_model_name", "device", "dtype", "tp_size", "attention_backend",
            "max_total_num_tokens", "max_running_requests", "chunked_prefill_size", "tool_call_parser",
            "reasoning_parser", "disable_radix_cache")
    return {k: info.get(k) for k in keys if k in info}


# --- sweep ------------------------------------------------------------------------------------
def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def summarize_level(route: str, concurrency: int, rounds: list[RoundResult]) -> dict:
    reps = [r.summary() for r in rounds]
    roles = [role for role in ("client", *ROLES) if all(role in r["cpu_ms_per_request"] for r in reps)]
    return {
        "route": route, "path": ROUTE_PATHS[route], "concurrency": concurrency,
        "tokens_per_s": _median([r["tokens_per_s"] for r in reps]),
        "tokens_per_s_best": max(r["tokens_per_s"] for r in reps),  # least disturbed round on a shared machine
        "requests_per_s": _median([r["requests_per_s"] for r in reps]),
        "p50_ms": _median([r["p50_ms"] for r in reps]),
        "p99_ms": _median([r["p99_ms"] for r in reps]),
        "mean_output_tokens": _median([r["mean_output_tokens"] for r in reps]),
        "cpu_ms_per_request": {role: _median([r["cpu_ms_per_request"][role] for r in reps]) for role in roles},
        "requests": sum(r["requests"] for r in reps),
        "errors": sum(r["errors"] for r in reps),
        "repetitions": reps,
    }


def ratios(levels: list[dict]) -> list[dict]:
    """(a)/(b) and (a)/(c) of output tokens/s per concurrency: of the medians, and of the best rounds."""
    def ratio(x: float | None, y: float | None) -> float | None:
        return round(x / y, 4) if x and y else None

    by = {(lv["route"], lv["concurrency"]): lv for lv in levels}
    out = []
    for c in sorted({lv["concurrency"] for lv in levels}):
        a, b, cc, d = (by.get((route, c)) or {} for route in ROUTES)
        out.append({"concurrency": c,
                    "d_over_a": ratio(d.get("tokens_per_s"), a.get("tokens_per_s")),
                    "a_over_b": ratio(a.get("tokens_per_s"), b.get("tokens_per_s")),
                    "a_over_c": ratio(a.get("tokens_per_s"), cc.get("tokens_per_s")),
                    "a_over_b_best": ratio(a.get("tokens_per_s_best"), b.get("tokens_per_s_best")),
                    "a_over_c_best": ratio(a.get("tokens_per_s_best"), cc.get("tokens_per_s_best"))})
    return out


async def served_model(client: httpx.AsyncClient) -> str | None:
    try:
        data = (await client.get("/v1/models")).json()["data"]
        return data[0]["id"] if data else None
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        return None


async def check_prompts(client: httpx.AsyncClient, prompts: list[Prompt], model: str | None) -> None:
    """The chat route must feed the engine what /tokenize says (otherwise (a) vs (b) is unfair)."""
    p = prompts[0]
    body = {"model": model, "messages": p.messages, "max_tokens": 1, "logprobs": True,
            "return_tokens_as_token_ids": True}
    r = await client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    got = r.json()["choices"][0]["message"]["prompt_token_ids"]
    if got != p.ids:
        raise RuntimeError("/v1/chat/completions prompt_token_ids differ from /tokenize: not the same prompts")


async def sweep(cfg: BenchConfig, server: Server) -> dict:
    base_url = server.base_url
    async with make_client(base_url, cfg.api_key, 4, cfg.request_timeout_s) as client:
        model = await served_model(client)
        prompts = await tokenize_prompts(client, make_chats(cfg.prompts))
        await check_prompts(client, prompts, model)
    levels = []
    for concurrency in cfg.concurrency:
        n_requests = max(concurrency * cfg.requests_per_worker, cfg.min_requests)
        rounds: dict[str, list[RoundResult]] = {route: [] for route in ROUTES}
        async with WorkerClients(base_url, cfg.api_key, concurrency, cfg.request_timeout_s) as clients:
            for route in ROUTES:  # warm-up: opens the pool's connections, fills the prefix cache
                warm = await run_round(clients, route, prompts, cfg.sampling, model, concurrency, concurrency,
                                       cfg.round_time_limit_s)
                print(f"[bench] c={concurrency:<4} warm-up {route:<12} {warm.tokens_per_s:9.1f} tok/s "
                      f"errors={warm.errors}", flush=True)
            for rep in range(cfg.repetitions):
                order = ROUTES[rep % len(ROUTES):] + ROUTES[:rep % len(ROUTES)]
                for route in order:
                    rr = await run_round(clients, route, prompts, cfg.sampling, model, concurrency, n_requests,
                                         cfg.round_time_limit_s, prompt_offset=rep, meter=server.meter())
                    rounds[route].append(rr)
                    print(f"[bench] c={concurrency:<4} rep {rep} {route:<12} {rr.tokens_per_s:9.1f} tok/s  "
                          f"p50 {ms(percentile(rr.latencies_s, 50))} ms  p99 {ms(percentile(rr.latencies_s, 99))} ms"
                          f"  n={rr.requests} errors={rr.errors}  server CPU ms/req "
                          f"{rr.summary()['cpu_ms_per_request']}", flush=True)
        levels += [summarize_level(route, concurrency, rounds[route]) for route in ROUTES]
    rs = ratios(levels)
    notes = []
    if cfg.sampling.ignore_eos:  # a route that drops ignore_eos returns shorter answers: compare tok/s, not latency
        for route in ROUTES:
            short = [lv["mean_output_tokens"] for lv in levels if lv["route"] == route
                     and lv["mean_output_tokens"] is not None and lv["mean_output_tokens"] < cfg.sampling.max_tokens]
            if short:
                notes.append(f"{route}: {min(short)}-{max(short)} output tokens per request with max_tokens="
                             f"{cfg.sampling.max_tokens} and ignore_eos: the route does not honour ignore_eos "
                             "(compare tokens/s; its latencies are for shorter answers)")
    at = next((r for r in rs if r["concurrency"] == TARGETS["a_over_b_at_concurrency"]), None)
    return {
        "model": model, "prompts": len(prompts),
        "prompt_tokens": {"min": min(len(p.ids) for p in prompts), "max": max(len(p.ids) for p in prompts),
                          "mean": round(sum(len(p.ids) for p in prompts) / len(prompts), 1)},
        "levels": levels, "ratios": rs, "notes": notes,
        "targets": {**TARGETS,
                    "a_over_b_met": None if at is None or at["a_over_b"] is None
                    else at["a_over_b"] >= TARGETS["a_over_b_min"],
                    "d_over_a_met": None if at is None or at["d_over_a"] is None
                    else at["d_over_a"] >= TARGETS["d_over_a_min"],
                    "a_over_c_met": all(r["a_over_c"] is not None and r["a_over_c"] >= TARGETS["a_over_c_min"]
                                        for r in rs)},
    }


# --- load -------------------------------------------------------------------------------------
async def load_test(cfg: BenchConfig, server: Server) -> dict:
    base_url = server.base_url
    async with make_client(base_url, cfg.api_key, 4, cfg.request_timeout_s) as client:
        model = await served_model(client)
        prompts = await tokenize_prompts(client, make_chats(cfg.prompts))
    c = cfg.load_concurrency
    async with WorkerClients(base_url, cfg.api_key, c, cfg.request_timeout_s) as clients:
        warm = await run_round(clients, "ours", prompts, cfg.sampling, model, c, c, cfg.round_time_limit_s)
        print(f"[bench] load warm-up: {warm.requests} requests, errors={warm.errors}", flush=True)
        # Bounded by time; the count bound only guards against a runaway loop.
        rr = await run_round(clients, "ours", prompts, cfg.sampling, model, c, 10**7, cfg.load_duration_s,
                             meter=server.meter())
    async with make_client(base_url, cfg.api_key, 1, 60) as client:
        health = (await client.get("/health")).status_code
        after = await send(client, "ours", prompts[0], cfg.sampling, model)
    result = {
        "route": "ours", "concurrency": c, "duration_s": cfg.load_duration_s, "model": model,
        **rr.summary(),
        "healthy_after": health == 200 and after.ok,
        "health_status_after": health, "request_after_ok": after.ok, "request_after_error": after.error,
    }
    return result


# --- main -------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> BenchConfig:
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="sglgym bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", help="target a running server (e.g. http://127.0.0.1:30000, no /v1)")
    p.add_argument("--api-key", help="bearer key of the target (also given to the server the bench starts)")
    p.add_argument("--server-pid", type=int, help="with --base-url on this machine: the server's main PID "
                   "(adds server CPU ms per request by process to the results)")
    p.add_argument("--serve-args", default=d.serve_args,
                   help=f"arguments for the `sglgym serve` the bench starts (default: {d.serve_args!r})")
    p.add_argument("--concurrency", default=",".join(map(str, d.concurrency)), help="comma-separated sweep")
    p.add_argument("--repetitions", type=int, default=d.repetitions)
    p.add_argument("--requests-per-worker", type=int, default=d.requests_per_worker)
    p.add_argument("--min-requests", type=int, default=d.min_requests)
    p.add_argument("--round-time-limit", type=float, default=d.round_time_limit_s, help="seconds per round")
    p.add_argument("--prompts", type=int, default=d.prompts, help="distinct chats (cycled)")
    p.add_argument("--max-tokens", type=int, default=d.sampling.max_tokens)
    p.add_argument("--temperature", type=float, default=d.sampling.temperature)
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout_s)
    p.add_argument("--load", action="store_true", help="load test instead of the sweep")
    p.add_argument("--load-concurrency", type=int, default=d.load_concurrency)
    p.add_argument("--load-duration", type=float, default=d.load_duration_s, help="seconds")
    p.add_argument("--out", type=Path, help="JSON path (default: bench/results/engine[-load]-<cpu|gpu>.json)")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    concurrency = [int(x) for x in a.concurrency.split(",") if x.strip()]
    if not concurrency or min(concurrency) < 1:
        p.error("--concurrency needs positive integers")
    return BenchConfig(
        base_url=a.base_url.rstrip("/") if a.base_url else None, api_key=a.api_key, serve_args=a.serve_args,
        concurrency=concurrency, repetitions=max(1, a.repetitions),
        requests_per_worker=max(1, a.requests_per_worker), min_requests=max(1, a.min_requests),
        round_time_limit_s=a.round_time_limit, prompts=max(1, a.prompts),
        sampling=Sampling(a.max_tokens, a.temperature, not a.no_ignore_eos), request_timeout_s=a.request_timeout,
        server_pid=a.server_pid, load=a.load, load_concurrency=a.load_concurrency,
        load_duration_s=a.load_duration, out=a.out, plot=not a.no_plot,
    )


def _config_dict(cfg: BenchConfig) -> dict:
    d = asdict(cfg)
    d["out"] = str(cfg.out) if cfg.out else None
    d.pop("api_key")
    return d


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(list(sys.argv[1:] if argv is None else argv))
    machine = machine_info()
    if cfg.base_url:
        server = Server(cfg.base_url, processes=ServerProcesses.find(cfg.server_pid) if cfg.server_pid else None)
    else:
        cpu = not machine["gpus"] or "--device cpu" in cfg.serve_args
        server = start_server(cfg.serve_args, cfg.api_key, cpu=cpu)
    started = time.time()
    try:
        info = server_info(server.base_url, cfg.api_key)
        body = asyncio.run(load_test(cfg, server) if cfg.load else sweep(cfg, server))
    finally:
        stop_server(server)
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    tag = device_tag(machine)
    out = cfg.out or RESULTS_DIR / (f"engine-load-{tag}.json" if cfg.load else f"engine-{tag}.json")
    result = {
        "bench": "engine-load" if cfg.load else "engine-routes",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_s": round(time.time() - started, 1),
        "machine": machine,
        "server": {"base_url": server.base_url, "started_by_bench": server.process is not None,
                   "processes": server.processes.pids if server.processes else None,
                   "serve_args": cfg.serve_args if server.process is not None else None, "env": server.env,
                   **info},
        "config": _config_dict(cfg),
        **body,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    if cfg.load:
        print(f"\nload: {result['concurrency']} concurrent chat requests for {cfg.load_duration_s:.0f} s: "
              f"{result['requests']} requests, {result['errors']} errors, {result['tokens_per_s']:.1f} output "
              f"tok/s, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, "
              f"healthy after: {result['healthy_after']}")
    else:
        print("\n" + format_table(result["levels"], result["ratios"]))
        t = result["targets"]
        print(f"targets: (a)/(b) >= {t['a_over_b_min']} at concurrency {t['a_over_b_at_concurrency']}: "
              f"{t['a_over_b_met']};  (a)/(c) >= {t['a_over_c_min']} at every level: {t['a_over_c_met']}")
        for note in result["notes"]:
            print(f"note: {note}")
        if cfg.plot:
            png = out.with_suffix(".png")
            where = machine["gpus"][0] if machine["gpus"] else machine["cpu_model"]
            commit = (machine["git_commit"] or "")[:8]
            title = (f"sglgym bench: {result['model']} on {where} ({machine['cpu_cores']} cores), "
                     f"max_tokens={cfg.sampling.max_tokens}, sglang {machine['sglang']}, {commit}")
            plot(result["levels"], title, png)
            print(f"plot: {png}")
    print(f"json: {out}")
    return result


if __name__ == "__main__":
    main()
