"""Benchmarks for sglgym.kernels (not tests; results go to bench/results/kernels-*.json).

    python bench/bench_kernels.py cpu                 # chunked torch path vs naive torch, T=4096, V=32000
    python bench/bench_kernels.py gpu                 # Triton vs torch eager / torch.compile (needs CUDA)
    python bench/bench_kernels.py gpu --smoke         # tiny shapes; runs on CPU too (Triton interpreter)

CPU: every measurement runs in a fresh subprocess with MALLOC_MMAP_THRESHOLD_ fixed, so large buffers are
mmapped and returned on free and the peak RSS (VmHWM, reset through /proc/self/clear_refs) tracks live
tensors. "extra" = peak minus the RSS with the inputs (logits, O(T) vectors) already resident.
GPU: CUDA events, median of `--reps`; peak = torch.cuda.max_memory_allocated during fwd+bwd, reported as
"extra" (above the resident inputs) and relative to the logits bytes (total, logits included).
GB/s counts the logits path's unavoidable traffic, 3 * T * V * bytes (read fwd, read + write bwd).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"


# --------------------------------------------------------------------------------------------------------
# shared inputs and the naive baseline
# --------------------------------------------------------------------------------------------------------


def make_inputs(torch, t: int, v: int, device: str, dtype, seq_len: int = 1024, hidden: int | None = None):
    g = torch.Generator(device="cpu").manual_seed(0)
    n_seq = max(1, t // seq_len)
    cu = torch.arange(0, n_seq + 1, dtype=torch.int32) * (t // n_seq)
    cu[-1] = t
    # every token is a loss token: masked rows would let the kernels skip work the baselines still do
    mask = torch.ones(t, dtype=torch.bool)
    inp = dict(
        target=torch.randint(0, v, (t,), generator=g),
        adv=torch.randn(t, generator=g),
        mask=mask,
        cu=cu,
    )
    inp = {k: x.to(device) for k, x in inp.items()}
    if hidden is None:
        inp["logits"] = (torch.randn(t, v, generator=g) * 2).to(device=device, dtype=dtype)
    else:
        inp["hidden"] = torch.randn(t, hidden, generator=g).to(device=device, dtype=dtype)
        inp["weight"] = (torch.randn(v, hidden, generator=g) / hidden**0.5).to(device=device, dtype=dtype)
    # old logprobs = current ones + noise: ratios ~1, realistic clip fractions (clipped rows have zero
    # gradient, which must not make the benchmark easier than training is)
    from sglgym.kernels import token_logprobs

    with torch.no_grad():
        if hidden is None:
            lp = token_logprobs(inp["logits"], inp["target"], backend="torch")
        else:
            lp = token_logprobs(inp["hidden"], inp["target"], weight=inp["weight"], backend="torch")
        inp["old"] = lp + 0.05 * torch.randn(t, generator=g).to(device)
    return inp


def producer(torch):
    """Stands in for lm_head: returns a preallocated logits buffer as a non-leaf tensor and drops its
    gradient in backward (as a matmul backward would after using it). With a leaf tensor instead,
    autograd would copy the gradient into .grad and hide what in-place backward saves."""

    class Producer(torch.autograd.Function):
        @staticmethod
        def forward(ctx, anchor, buf):
            return buf.detach()

        @staticmethod
        def backward(ctx, grad):
            return torch.zeros(()), None

    anchor = torch.zeros((), requires_grad=True)
    return lambda buf: Producer.apply(anchor, buf)


def naive_core(torch, logits, target, old, adv, mask, eps=0.2):
    """Plain eager GRPO token-mean loss: what a trainer writes without a kernel (fp32 log_softmax)."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(1, target[:, None]).squeeze(1)
    ratio = torch.exp(logp - old)
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps, 1 + eps))
    m = mask.float()
    return (pg * m).sum() / m.sum().clamp(min=1)


# --------------------------------------------------------------------------------------------------------
# CPU
# --------------------------------------------------------------------------------------------------------


def _proc_status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


CPU_METHODS = ["naive-eager", "reference", "chunked", "chunked-inplace"]


def cpu_worker(mode: str, t: int, v: int, reps: int) -> dict:
    """mode "time": all methods interleaved round-robin in this one process (the machine may be shared:
    interleaving exposes every method to the same load). mode "mem:<method>": one step's peak RSS."""
    import torch

    from sglgym.kernels import GRPOLossConfig, grpo_loss
    from sglgym.kernels.reference import grpo_loss_reference

    inp = make_inputs(torch, t, v, "cpu", torch.float32)
    cfg = GRPOLossConfig()
    base = inp["logits"]
    buf = base.clone()
    make_logits = producer(torch)
    args = (inp["target"], inp["old"], inp["adv"], inp["mask"], inp["cu"])

    def step(method):
        x = make_logits(buf)
        if method == "naive-eager":
            loss = naive_core(torch, x, inp["target"], inp["old"], inp["adv"], inp["mask"])
        elif method == "reference":
            loss, _ = grpo_loss_reference(x, *args, cfg)
        elif method == "chunked":
            loss, _ = grpo_loss(x, *args, cfg, backend="torch")
        elif method == "chunked-inplace":
            loss, _ = grpo_loss(x, *args, cfg, backend="torch", inplace_backward=True)
        else:
            raise ValueError(method)
        loss.backward()
        return float(loss)

    if mode.startswith("mem:"):
        method = mode[4:]
        step(method)  # warm-up (allocator, first-call costs)
        buf.copy_(base)
        rss0 = _proc_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        loss = step(method)
        return {"method": method, "loss": loss, "peak_extra_bytes": _proc_status("VmHWM") - rss0}
    times = {m: [] for m in CPU_METHODS}
    losses = {}
    for m in CPU_METHODS:
        buf.copy_(base)
        step(m)  # warm-up
    for _ in range(reps):
        for m in CPU_METHODS:
            buf.copy_(base)  # the in-place variant overwrote the logits with their gradient
            t0 = time.perf_counter()
            losses[m] = step(m)
            times[m].append(time.perf_counter() - t0)
    return {"times_s": times, "losses": losses, "threads": torch.get_num_threads()}


def cpu_description() -> dict:
    model = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    import torch

    return {"device": f"CPU: {model}", "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "mem_total_bytes": mem, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__}


def run_cpu(args) -> dict:
    t, v = args.tokens, args.vocab
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))

    def worker(mode):
        out = subprocess.run([sys.executable, __file__, "_cpu_worker", mode, str(t), str(v), str(args.reps)],
                             env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    load_before = os.getloadavg()
    timing = worker("time")
    mems = {m: worker("mem:" + m) for m in CPU_METHODS}
    load_after = os.getloadavg()
    logits_bytes = t * v * 4
    rows = []
    for m in CPU_METHODS:
        ts = timing["times_s"][m]
        rows.append({"method": m, "loss": timing["losses"][m], "time_s_median": statistics.median(ts),
                     "time_s_min": min(ts), "times_s": ts, "peak_extra_bytes": mems[m]["peak_extra_bytes"]})
        print(m, f"median {rows[-1]['time_s_median']*1e3:.0f} ms, min {rows[-1]['time_s_min']*1e3:.0f} ms,",
              f"extra {rows[-1]['peak_extra_bytes']/2**20:.0f} MiB", file=sys.stderr)
    naive = rows[0]
    for r in rows:
        r["speed_vs_naive_median"] = naive["time_s_median"] / r["time_s_median"]
        r["speed_vs_naive_min"] = naive["time_s_min"] / r["time_s_min"]
        r["peak_extra_vs_naive"] = r["peak_extra_bytes"] / naive["peak_extra_bytes"]
        r["peak_total_vs_naive"] = (r["peak_extra_bytes"] + logits_bytes) / (naive["peak_extra_bytes"] + logits_bytes)
    machine = cpu_description()
    machine.update(threads=timing["threads"], loadavg_before=load_before, loadavg_after=load_after)
    return {
        "bench": "grpo_loss fwd+bwd, CPU, chunked torch path vs naive torch",
        "machine": machine,
        "shape": {"T": t, "V": v, "dtype": "float32", "seqs": max(1, t // 1024), "loss": "GRPO token-mean"},
        "logits_bytes": logits_bytes,
        "targets": {"peak_vs_naive_max": 0.25, "speed_vs_naive_min": 1.0},
        "results": rows,
        "notes": "naive-eager: log_softmax + gather + clip loss in eager torch, fp32; reference: "
                 "sglgym.kernels.reference (same math + metrics, materialises [T, V]); chunked: "
                 "grpo_loss(backend='torch'); -inplace: gradient written into the logits buffer. "
                 "The logits come from a stand-in for lm_head that drops its gradient in backward. "
                 "peak_extra = peak RSS above the resident inputs, so it includes the [T, V] logits "
                 "gradient unless in place. Timing: methods interleaved round-robin in one process; "
                 "the machine is shared (see loadavg), so min is the least disturbed figure.",
    }


# --------------------------------------------------------------------------------------------------------
# GPU (also --smoke on CPU under the Triton interpreter, to check the script itself)
# --------------------------------------------------------------------------------------------------------


def run_gpu(args) -> dict:
    if args.smoke and not _has_cuda():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from sglgym.kernels import GRPOLossConfig, grpo_loss, token_logprobs

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = dev == "cuda"
    dtype = torch.bfloat16
    cfg = GRPOLossConfig()
    batches = [1] if args.smoke else args.batches
    vocabs = [1000, 3001] if args.smoke else args.vocabs
    hidden = 64 if args.smoke else args.hidden
    seq_len = 64 if args.smoke else 1024
    reps = 2 if args.smoke else args.reps

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(fn, prep):
        for _ in range(1 if args.smoke else 3):
            prep()
            fn()
        times = []
        for _ in range(reps):
            prep()
            sync()
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                sync()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        prep()
        sync()
        peak = None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            sync()
            peak = torch.cuda.max_memory_allocated() - before
        return statistics.median(times), peak

    compiled = torch.compile(lambda *a: naive_core(torch, *a)) if not args.no_compile else None
    rows = []
    for b in batches:
        t = b * seq_len
        for v in vocabs:
            # ---------------- logits path
            inp = make_inputs(torch, t, v, dev, dtype, seq_len=seq_len)
            buf = inp.pop("logits")
            logits_bytes = buf.numel() * buf.element_size()
            seed = torch.Generator(device=dev)
            make_logits = producer(torch)

            def prep():
                # refill in place (the in-place variant leaves gradients in the buffer): no second [T,V] copy
                seed.manual_seed(1)
                buf.normal_(0.0, 2.0, generator=seed)

            prep()
            with torch.no_grad():
                lp = token_logprobs(buf, inp["target"], backend="torch")
                inp["old"] = lp + 0.05 * torch.randn(t, device=dev, generator=seed)
            a = (inp["target"], inp["old"], inp["adv"], inp["mask"])

            methods = {
                "sglgym-triton-inplace": lambda: grpo_loss(make_logits(buf), *a, inp["cu"], cfg, backend="triton",
                                                           inplace_backward=True)[0].backward(),
                "sglgym-triton": lambda: grpo_loss(make_logits(buf), *a, inp["cu"], cfg,
                                                   backend="triton")[0].backward(),
                "torch-eager": lambda: naive_core(torch, make_logits(buf), *a).backward(),
            }
            if compiled is not None:
                methods["torch-compile"] = lambda: compiled(make_logits(buf), *a).backward()
            res = {}
            for name, fn in methods.items():
                try:
                    sec, peak = timed(fn, prep)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    res[name] = {"oom": True}
                    continue
                res[name] = {
                    "time_ms": sec * 1e3,
                    "peak_extra_bytes": peak,
                    # total peak over the logits bytes; the logits buffer itself is resident (counted once)
                    "peak_total_over_logits": None if peak is None else (peak + logits_bytes) / logits_bytes,
                    "gbps": 3 * logits_bytes / sec / 1e9,
                }
            eager = res.get("torch-eager", {}).get("time_ms")
            for r in res.values():
                if eager and "time_ms" in r:
                    r["speedup_vs_eager"] = eager / r["time_ms"]
            rows.append({"path": "logits", "B": b, "T": t, "V": v, "dtype": str(dtype), "logits_bytes": logits_bytes,
                         "methods": res})
            print(json.dumps(rows[-1]), file=sys.stderr)
            del buf, inp
            if cuda:
                torch.cuda.empty_cache()

            # ---------------- fused linear path
            inp = make_inputs(torch, t, v, dev, dtype, seq_len=seq_len, hidden=hidden)
            h = inp.pop("hidden").requires_grad_()
            w = inp.pop("weight").requires_grad_()
            a = (inp["target"], inp["old"], inp["adv"], inp["mask"])

            def prep_lin():
                h.grad = None
                w.grad = None

            methods = {
                "sglgym-triton-linear": lambda: grpo_loss(h, *a, inp["cu"], cfg, weight=w,
                                                          backend="triton")[0].backward(),
                "torch-eager": lambda: naive_core(torch, h @ w.t(), *a).backward(),
            }
            if compiled is not None:
                methods["torch-compile"] = lambda: compiled(h @ w.t(), *a).backward()
            res = {}
            for name, fn in methods.items():
                try:
                    sec, peak = timed(fn, prep_lin)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    res[name] = {"oom": True}
                    continue
                res[name] = {"time_ms": sec * 1e3, "peak_extra_bytes": peak,
                             "tflops_at_8THV": 8 * t * hidden * v / sec / 1e12}
            eager = res.get("torch-eager", {}).get("time_ms")
            for r in res.values():
                if eager and "time_ms" in r:
                    r["speedup_vs_eager"] = eager / r["time_ms"]
            rows.append({"path": "fused-linear", "B": b, "T": t, "V": v, "H": hidden, "dtype": str(dtype),
                         "logits_bytes_avoided": t * v * 2, "methods": res})
            print(json.dumps(rows[-1]), file=sys.stderr)
            del h, w, inp
            if cuda:
                torch.cuda.empty_cache()
    import triton

    return {
        "bench": "grpo_loss fwd+bwd, GPU: Triton vs torch eager / torch.compile",
        "device": torch.cuda.get_device_name() if cuda else "CPU (smoke run, Triton interpreter: times meaningless)",
        "torch": torch.__version__, "triton": triton.__version__,
        "targets": {"speedup_vs_eager_min": 8.0, "peak_total_over_logits_max": 1.1, "roofline_gbps": 3000},
        "notes": "logits path: bf16 logits, T = B*1024 packed, GRPO token-mean, all tokens in the loss. "
                 "gbps = 3*T*V*2 bytes / time. fused-linear: hidden [T,H] x W [V,H] bf16; torch baselines "
                 "materialise the [T,V] logits; ours recomputes logits chunks in backward (8*T*H*V FLOPs).",
        "results": rows,
    }


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_cpu_worker":
        _, _, mode, t, v, reps = sys.argv
        print(json.dumps(cpu_worker(mode, int(t), int(v), int(reps))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["cpu", "gpu"])
    p.add_argument("--tokens", type=int, default=4096, help="cpu: T")
    p.add_argument("--vocab", type=int, default=32000, help="cpu: V")
    p.add_argument("--batches", type=int, nargs="+", default=[4, 16], help="gpu: B (T = B*1024)")
    p.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256, 151936], help="gpu: V")
    p.add_argument("--hidden", type=int, default=4096, help="gpu: H for the fused-linear path")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--smoke", action="store_true", help="gpu mode with tiny shapes (works on CPU)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.mode == "cpu":
        result = run_cpu(args)
        out = args.out or RESULTS / "kernels-cpu.json"
    else:
        result = run_gpu(args)
        if args.smoke:
            out = args.out
        else:
            name = result["device"].lower().replace("nvidia", "").strip().replace(" ", "-")
            out = args.out or RESULTS / f"kernels-{name}.json"
    text = json.dumps(result, indent=1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(text)


if __name__ == "__main__":
    main()
