"""Where a run's metrics go, every step: `metrics.jsonl` always (the plot and resume read it), TensorBoard
event files in `OUT/tensorboard/` and Weights & Biases when `loggers` names them.

Per-env metrics are the `<metric>/<env>` keys, so TensorBoard shows one chart per metric with a line per
env. On resume the jsonl keeps the steps up to the checkpoint and drops the later ones; TensorBoard is
told the same (`purge_step`), and W&B continues the same run id.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path


def scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, numbers.Number) and not isinstance(v, bool) and k != "step"}


def keep_steps_up_to(metrics_path: Path, last_step: int) -> int:
    """Cut metrics.jsonl back to the steps <= last_step (a crash may have logged later steps that the
    checkpoint does not hold); returns how many lines were kept."""
    if not metrics_path.exists():
        return 0
    kept = [line for line in metrics_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    metrics_path.write_text("".join(line + "\n" for line in kept))
    return len(kept)


class RunTracker:
    def __init__(self, out_dir: Path, loggers: list[str], first_step: int = 1, config: dict | None = None,
                 wandb_project: str = "sglgym", wandb_mode: str = "offline"):
        self.metrics_path = Path(out_dir) / "metrics.jsonl"
        if first_step == 1:
            self.metrics_path.write_text("")
        else:
            keep_steps_up_to(self.metrics_path, first_step - 1)
        self.tb = self.wandb_run = None
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=first_step)
        if "wandb" in loggers:
            self.wandb_run = _wandb_run(Path(out_dir), wandb_project, wandb_mode, config, resumed=first_step > 1)

    def log(self, metrics: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        step, values = metrics.get("step"), scalars(metrics)
        if step is None:
            return
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def summary(self, summary: dict) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(scalars(summary))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _wandb_run(out_dir: Path, project: str, mode: str, config: dict | None, resumed: bool):
    """A new W&B run, or the one a resumed run started (its id is kept in OUT/wandb_run_id)."""
    import secrets

    import wandb

    id_file = out_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if resumed and id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(project=project, id=run_id, resume="allow", dir=str(out_dir), mode=mode, config=config,
                      settings=wandb.Settings(silent=True))
