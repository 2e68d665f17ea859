"""PNG of a run: reward and train/engine mismatch per GRPO step."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_path: Path, png_path: Path, summary: dict | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("reward_mean") is not None]
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, [r["reward_mean"] for r in rows], marker=".", label="rollout reward (train prompts, before filtering)")
    envs = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("reward_mean/")})
    if len(envs) > 1:   # a mixed run: one line per env as well
        for env in envs:
            pts = [(r["step"], r[f"reward_mean/{env}"]) for r in rows if f"reward_mean/{env}" in r]
            ax1.plot([s for s, _ in pts], [v for _, v in pts], lw=1, alpha=0.8, label=f"  {env}")
    if summary:
        last = steps[-1] if steps else 1
        ax1.axhline(summary["reward_before"], color="gray", ls="--", label=f"held-out before {summary['reward_before']:.2f}")
        ax1.axhline(summary["reward_after"], color="green", ls="--", label=f"held-out after {summary['reward_after']:.2f}")
        ax1.set_xlim(0, max(last, 1) + 1)
    ax1.set_xlabel("GRPO step")
    ax1.set_ylabel("mean reward")
    ax1.set_ylim(-0.02, 1.02)
    ax1.legend(loc="best", fontsize=7)
    ax1.set_title("reward")
    mism = [(r["step"], r["token_mult_prob_error"]) for r in rows if "token_mult_prob_error" in r]
    if mism:
        ax2.plot([s for s, _ in mism], [m for _, m in mism], marker=".", color="tab:red")
    ax2.axhline(1.05, color="gray", ls="--", label="health bar 1.05")
    ax2.set_xlabel("GRPO step")
    ax2.set_ylabel("token_mult_prob_error")
    ax2.set_title("engine vs trainer mismatch")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)
