"""sglgym's fused-linear GRPO loss (torch backend) vs Liger-Kernel's chunked GRPO loss, fwd+bwd on CPU.

    python bench/bench_liger.py                          # B=4 x 512 tokens, H=256, V=32000, fp32
    python bench/bench_liger.py --ours default,rows=256,mib=64 --reps 3   # ours: default, rows=N, mib=N

Liger-Kernel is not a dependency of sglgym. Install it anywhere and point SGLGYM_LIGER_PATH at it, e.g.
    python -m pip install --target /tmp/liger-pkgs --no-deps liger-kernel==0.8.5
    SGLGYM_LIGER_PATH=/tmp/liger-pkgs python bench/bench_liger.py
(or `pip install liger-kernel==0.8.5` into the environment). Results: bench/results/kernels-liger-cpu.json.

Both sides compute the same thing: hidden [B*S, H] x lm_head W [V, H] -> token logprobs -> PPO-clip loss
(eps 0.2/0.2, no KL, token mean over all loss tokens), gradients for hidden and W; [T, V] never exists.
  ours:  grpo_loss(hidden, ..., GRPOLossConfig(), weight=W, backend="torch"), row chunks of the
         default budget (sglgym.kernels.fused_linear.DEFAULT_LINEAR_CHUNK_BYTES) or `rows=N` / `mib=N`.
  liger: LigerFusedLinearGRPOLoss(loss_type="dapo", beta=0, use_ref_model=False, chunk_size=1,
         compiled=False): dapo = token mean over the batch's mask (= our "token-mean" on one rank).
Differences: Liger takes [B, S] tensors and per-sequence advantages (we broadcast them to tokens), runs
its backward inside forward (one sequence per chunk, vocab chunks of 4096) and returns a clip-fraction
metric; ours also clamps |log ratio| <= 20 (never active here) and returns more metrics (O(T) work).
compiled=False: Liger would torch.compile only the O(T) loss math; on CPU that costs a C++ build per
shape and no measurable time here. JSON "agreement": loss and gradient differences to ours-default.

Timing: one process runs every method round-robin (warm-up first), so all see the same machine load
(this machine may be shared: the load average before/after is recorded); median and min of --reps.
Memory: each method again in a fresh process with MALLOC_MMAP_THRESHOLD_=65536, so glibc mmaps every
buffer >= 64 KiB and returns it on free, and the peak RSS (VmHWM, reset via /proc/self/clear_refs after
a warm-up step) tracks live tensors: peak_extra = peak RSS - RSS with the inputs resident and the
.grad fields cleared, i.e. gradients (dW is V*H*4 bytes = 31 MiB here) plus every temporary. tracemalloc
cannot see torch's allocations and the CPU allocator keeps no peak statistics, so RSS it is; the same
method applies to both libraries. (Timing runs with glibc's default malloc settings.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_kernels import _proc_status, cpu_description  # noqa: E402  (same directory)

RESULTS = ROOT / "bench" / "results"
LIGER_ENV = "SGLGYM_LIGER_PATH"
LIGER_HINT = (f"Liger-Kernel not importable: pip install liger-kernel==0.8.5 (or pip install --target DIR "
              f"--no-deps liger-kernel==0.8.5 and set {LIGER_ENV}=DIR)")


def import_liger():
    extra = os.environ.get(LIGER_ENV)
    if extra and extra not in sys.path:
        sys.path.insert(0, extra)
    try:
        import liger_kernel
        from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss
    except ImportError as e:
        raise SystemExit(f"{LIGER_HINT}\n({e})")
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("liger-kernel")
    except PackageNotFoundError:
        ver = getattr(liger_kernel, "__version__", "unknown")
    return LigerFusedLinearGRPOLoss, ver


def make_inputs(torch, b: int, s: int, h: int, v: int) -> dict:
    g = torch.Generator().manual_seed(0)
    t = b * s
    hidden = torch.randn(t, h, generator=g)
    weight = torch.randn(v, h, generator=g) / h**0.5
    target = torch.randint(0, v, (t,), generator=g)
    adv_seq = torch.randn(b, generator=g)
    from sglgym.kernels import token_logprobs

    with torch.no_grad():
        lp = token_logprobs(hidden, target, weight=weight, backend="torch")
    # old = current + noise: ratios ~1 with realistic clip fractions (clipped tokens get zero gradient)
    old = lp + 0.05 * torch.randn(t, generator=g)
    return dict(
        hidden=hidden.requires_grad_(), weight=weight.requires_grad_(), target=target, old=old,
        adv_seq=adv_seq, adv=adv_seq.repeat_interleave(s), mask=torch.ones(t, dtype=torch.bool),
        cu=torch.arange(b + 1, dtype=torch.int32) * s, b=b, s=s,
    )


def ours_rows(spec: str, t: int, v: int):
    """'default' -> None (the library picks), 'rows=N' -> N, 'mib=N' -> rows for an N MiB budget."""
    from sglgym.kernels.fused_linear import default_linear_chunk_rows

    if spec == "default":
        return None
    key, val = spec.split("=")
    if key == "rows":
        return int(val)
    if key == "mib":
        return default_linear_chunk_rows(t, v, int(float(val) * 2**20))
    raise ValueError(f"bad --ours entry {spec!r} (default, rows=N, mib=N)")


def make_steps(torch, inp: dict, specs: list[str], with_liger: bool) -> dict:
    from sglgym.kernels import GRPOLossConfig, grpo_loss

    cfg = GRPOLossConfig()
    t, v = inp["target"].shape[0], inp["weight"].shape[0]
    args = (inp["target"], inp["old"], inp["adv"], inp["mask"], inp["cu"], cfg)
    steps = {}
    for spec in specs:
        rows = ours_rows(spec, t, v)
        steps[f"sglgym-{spec}"] = (
            lambda rows=rows: grpo_loss(inp["hidden"], *args, weight=inp["weight"], backend="torch",
                                        chunk_rows=rows)[0]
        )
    if with_liger:
        liger_cls, _ = import_liger()
        liger = liger_cls(beta=0.0, compiled=False, use_ref_model=False, chunk_size=1, loss_type="dapo",
                          epsilon_low=0.2, epsilon_high=0.2)
        b, s = inp["b"], inp["s"]
        h3 = lambda: inp["hidden"].view(b, s, -1)  # noqa: E731  (a view keeps .grad on the [T, H] leaf)
        steps["liger"] = lambda: liger(h3(), inp["weight"], inp["target"].view(b, s), inp["mask"].view(b, s).float(),
                                       inp["adv_seq"], old_per_token_logps=inp["old"].view(b, s))[0]
    return steps


def run_step(inp: dict, fn) -> float:
    inp["hidden"].grad = None
    inp["weight"].grad = None
    loss = fn()
    loss.backward()
    return float(loss.detach())


def worker(mode: str, a) -> dict:
    """mode "time": every method round-robin in this process; "mem:<method>": one step's peak RSS."""
    import torch

    inp = make_inputs(torch, a.batch, a.seq, a.hidden, a.vocab)
    specs = a.ours.split(",")
    steps = make_steps(torch, inp, specs, not a.no_liger)
    if mode.startswith("mem:"):
        name = mode[4:]
        run_step(inp, steps[name])  # warm-up (first-call costs, allocator)
        inp["hidden"].grad = inp["weight"].grad = None
        rss0 = _proc_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        loss = run_step(inp, steps[name])
        return {"method": name, "loss": loss, "peak_extra_bytes": _proc_status("VmHWM") - rss0}
    times = {k: [] for k in steps}
    losses, grads = {}, {}
    for k, fn in steps.items():
        losses[k] = run_step(inp, fn)  # warm-up
        grads[k] = (inp["hidden"].grad.clone(), inp["weight"].grad.clone())
    for _ in range(a.reps):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            run_step(inp, fn)
            times[k].append(time.perf_counter() - t0)
    # agreement of every method with the first one (ours, default), as max |diff| / max |value|
    base = next(iter(steps))
    agree = {k: {"loss_abs_diff": abs(losses[k] - losses[base]),
                 **{f"{n}_grad_rel_diff": float((g - g0).abs().max() / g0.abs().max())
                    for n, g, g0 in zip(("hidden", "weight"), grads[k], grads[base])}}
             for k in steps}
    return {"times_s": times, "losses": losses, "agreement_vs_" + base: agree, "threads": torch.get_num_threads()}


def default_rows(a) -> tuple[int, int]:
    from sglgym.kernels.fused_linear import default_linear_chunk_rows, linear_chunk_bytes

    return default_linear_chunk_rows(a.batch * a.seq, a.vocab), linear_chunk_bytes()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--ours", default="default,mib=16,rows=512", help="default, rows=N, mib=N (comma list)")
    p.add_argument("--no-liger", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "kernels-liger-cpu.json"))
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._worker:
        print(json.dumps(worker(a._worker, a)))
        return
    liger_version = None if a.no_liger else import_liger()[1]  # fail early, with the install hint
    passthrough = [f"--batch={a.batch}", f"--seq={a.seq}", f"--hidden={a.hidden}", f"--vocab={a.vocab}",
                   f"--reps={a.reps}", f"--ours={a.ours}"] + (["--no-liger"] if a.no_liger else [])
    pypath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

    def sub(mode: str, mem: bool) -> dict:
        env = dict(os.environ, PYTHONPATH=pypath)
        if mem:
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        out = subprocess.run([sys.executable, __file__, f"--_worker={mode}", *passthrough], env=env,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"worker {mode} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    load_before = os.getloadavg()
    timing = sub("time", mem=False)
    mems = {k: sub("mem:" + k, mem=True) for k in timing["times_s"]}
    load_after = os.getloadavg()
    rows = []
    for k, ts in timing["times_s"].items():
        rows.append({"method": k, "loss": timing["losses"][k], "time_ms_median": statistics.median(ts) * 1e3,
                     "time_ms_min": min(ts) * 1e3, "times_ms": [x * 1e3 for x in ts],
                     "peak_extra_bytes": mems[k]["peak_extra_bytes"],
                     "peak_extra_mib": mems[k]["peak_extra_bytes"] / 2**20})
        print(f"{k:24s} median {rows[-1]['time_ms_median']:7.0f} ms  min {rows[-1]['time_ms_min']:7.0f} ms  "
              f"extra {rows[-1]['peak_extra_mib']:6.1f} MiB  loss {rows[-1]['loss']:.6f}", file=sys.stderr)
    machine = cpu_description()
    machine.update(threads=timing["threads"], loadavg_before=load_before, loadavg_after=load_after)
    t = a.batch * a.seq
    d_rows, d_bytes = default_rows(a)
    result = {
        "bench": "GRPO loss fwd+bwd through lm_head (fused linear), CPU: sglgym torch backend vs Liger-Kernel",
        "machine": machine,
        "shape": {"B": a.batch, "S": a.seq, "T": t, "H": a.hidden, "V": a.vocab, "dtype": "float32"},
        "liger_kernel": liger_version,
        "sglgym_default_chunk": {"budget_bytes": d_bytes, "rows": d_rows},
        "results": rows,
        "agreement": timing[next(k for k in timing if k.startswith("agreement"))],
        "notes": __doc__.split("Both sides", 1)[1].strip(),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
