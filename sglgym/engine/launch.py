"""`sglgym serve`: SGLang's own HTTP server, in this process, with our routes mounted on its app.

Every SGLang server argument passes through unchanged. Without a CUDA device (or with `--device cpu`)
it runs SGLang's CPU engine: SGLANG_USE_CPU_ENGINE=1, torch-native attention, a small KV pool, and
the `sgl_kernel` stand-in first on PYTHONPATH (this process and the scheduler/detokenizer it spawns).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

CPU_SHIM_DIR = Path(__file__).parent / "cpu_shim"
CPU_DEFAULTS = {  # only applied when the user did not pass the flag
    "--attention-backend": "torch_native",
    "--max-total-tokens": "16384",
    "--dtype": "float32",  # exact logprobs on CPU; `auto` would turn fp32 configs into fp16
}
# An idle CPU scheduler would busy-poll a whole core that the trainer, the environments and the clients
# need; it sleeps on its sockets instead and wakes on the next request.
CPU_DEFAULT_SWITCHES = ["--sleep-on-idle"]
DEFAULT_MODEL_FLAGS = {"--tool-call-parser": "qwen25", "--served-model-name": "sglgym-tiny"}
# A streamed chunk every 4 tokens instead of every token: per-chunk work in the HTTP process made streaming
# 0.76x the non-streaming throughput at 64 concurrent requests on 2 CPU cores, 0.98x with 4
# (bench/results/engine-stream-cpu-interval*.json).
DEFAULT_FLAGS = {"--stream-interval": "4"}


def _has_flag(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def wants_cpu(argv: list[str]) -> bool:
    device = _flag_value(argv, "--device")
    if device is not None:
        return device == "cpu"
    import torch
    return not torch.cuda.is_available()


def prepare_cpu_environment() -> None:
    """Must run before anything imports sglang: the env vars are read at import time."""
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    # One OpenMP thread per engine process unless set: the tiny CPU engine is bound by Python, and torch's
    # threads spinning against the trainer's (async GRPO) or other tenants slowed both several times over.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    shim = str(CPU_SHIM_DIR)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != shim]
    os.environ["PYTHONPATH"] = os.pathsep.join([shim, *paths])  # inherited by spawned children
    if sys.path[0] != shim:
        sys.path.insert(0, shim)
    if "sgl_kernel" in sys.modules and not getattr(sys.modules["sgl_kernel"], "__file__", "").startswith(shim):
        raise RuntimeError("sgl_kernel was imported before the CPU stand-in was put on the path")


def build_sglang_argv(argv: list[str], cpu: bool) -> list[str]:
    argv = list(argv)
    if not _has_flag(argv, "--model-path"):
        from sglgym.models import build_tiny_model
        argv += ["--model-path", str(build_tiny_model())]
        for flag, value in DEFAULT_MODEL_FLAGS.items():
            if not _has_flag(argv, flag):
                argv += [flag, value]
    if not _has_flag(argv, "--host"):
        argv += ["--host", "127.0.0.1"]
    for flag, value in DEFAULT_FLAGS.items():
        if not _has_flag(argv, flag):
            argv += [flag, value]
    if cpu:
        if not _has_flag(argv, "--device"):
            argv += ["--device", "cpu"]
        for flag, value in CPU_DEFAULTS.items():
            if not _has_flag(argv, flag):
                argv += [flag, value]
        argv += [s for s in CPU_DEFAULT_SWITCHES if not _has_flag(argv, s)]
    return argv


def parse_own_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="sglgym serve", add_help=False)
    p.add_argument("--training-temperature", type=float, default=None,
                   help="reject chat requests whose temperature differs (and any top_k)")
    p.add_argument("--training-top-p", type=float, default=None,
                   help="reject chat requests whose top_p differs (and any top_k)")
    p.add_argument("--max-request-mb", type=float, default=32.0,
                   help="larger request bodies get a 413 before they are read (default 32)")
    p.add_argument("--deterministic", action="store_true",
                   help="seeded, batch-invariant sampling: SGLang's --enable-deterministic-inference "
                        "(made to work on CPU by sglgym/engine/deterministic.py)")
    return p.parse_known_args(argv)


def serve(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print("usage: sglgym serve [--model-path DIR] [--training-temperature T] [--training-top-p P] "
              "[--deterministic] [--max-request-mb MB] [any SGLang server argument]\n\nWithout --model-path, serves the embedded "
              "tiny model. SGLang's own arguments follow:\n")
    own, rest = parse_own_args(argv)
    cpu = wants_cpu(rest)
    if cpu:
        prepare_cpu_environment()
    from . import deterministic
    is_deterministic = own.deterministic or _has_flag(rest, deterministic.SGLANG_FLAG)
    if is_deterministic and not _has_flag(rest, deterministic.SGLANG_FLAG):
        rest = [*rest, deterministic.SGLANG_FLAG]
    if cpu and is_deterministic and not any(_has_flag(rest, f) for f in deterministic.CPU_DEFAULTS):
        rest += [a for flag, value in deterministic.CPU_DEFAULTS.items() for a in (flag, value)]
    sglang_argv = build_sglang_argv(rest, cpu)

    from sglang.launch_server import run_server as sglang_run_server
    from sglang.srt.entrypoints.http_server import app
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    from .routes import RouteOptions, install_routes

    run_server = sglang_run_server
    if cpu and is_deterministic:
        deterministic.allow_cpu_attention_backend()   # before the arguments are resolved
        run_server = deterministic.run_server        # our scheduler entry: seeds + batch invariance on CPU
    server_args = prepare_server_args(sglang_argv)
    install_routes(app, RouteOptions(own.training_temperature, own.training_top_p,
                                     max_body_bytes=int(own.max_request_mb * (1 << 20))))
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
