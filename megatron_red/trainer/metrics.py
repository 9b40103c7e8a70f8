"""Per-step metrics: `metrics.jsonl` (one JSON object per step), TensorBoard scalars and, optionally, Weights & Biases.

W&B (`trainer.wandb_project`, extra `wandb`): the run's id is kept in `wandb_run_id` in the run directory, so
`--resume` continues the same W&B run; W&B writes under `<run dir>/wandb` and honours its own environment variables
(WANDB_MODE=offline, WANDB_ENTITY, ...). The x-axis is the RED step. W&B's history only moves forward (rewinding is a
W&B preview feature), so after a resume the steps logged between the last checkpoint and the kill keep their first
values there; metrics.jsonl and TensorBoard hold the resumed run's values.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

WANDB_ID_FILE = "wandb_run_id"


class MetricsLog:
    """Appends one line per step. On resume, lines past the checkpoint's step are dropped first, so a run
    killed between checkpoints and resumed has exactly one line per step."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True,
                 wandb_project: str | None = None, wandb_config: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _step_of(line) is not None and _step_of(line) <= resume_step
                    and not json.loads(line).get("final")]  # the resumed run logs its own final line
            self.path.write_text("".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=(resume_step or 0) + 1)
        self.wandb_run = None
        if wandb_project:
            self.wandb_run = _wandb_run(Path(run_dir), wandb_project, wandb_config, resume=resume_step is not None)

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(key, value, step)
        if self.wandb_run is not None and step >= self.wandb_run.step:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step" and _is_number(v)}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _wandb_run(run_dir: Path, project: str, config: dict | None, resume: bool):
    """The W&B run whose id this run directory recorded when resuming, else a new one."""
    import wandb

    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resume and id_file.exists() else None
    run = wandb.init(project=project, id=run_id, resume="allow" if run_id else None, dir=str(run_dir),
                     name=run_dir.name, config=config)
    id_file.write_text(run.id + "\n")
    return run


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class NullMetricsLog:
    """What ranks other than 0 log to: nothing (rank 0 writes metrics.jsonl and TensorBoard)."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass
