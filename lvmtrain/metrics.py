"""MetricLogger: console lines, `metrics.jsonl`, and Weights & Biases, all from rank 0.

W&B missing, offline or failing never stops training: a warning, and local logging goes on.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path

from lvmtrain.config.schema import LogConfig


class MetricLogger:
    def __init__(self, cfg: LogConfig, run_dir: Path, *, enabled: bool, run_name: str, config: dict,
                 wandb_id: str | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        self.wandb_id = wandb_id
        if enabled and cfg.wandb != "disabled":
            self.wandb = _start_wandb(cfg, run_dir, run_name, config, wandb_id)
            if self.wandb is not None:
                self.wandb_id = self.wandb.id

    def log(self, step: int, metrics: dict[str, float], *, console_keys: tuple[str, ...] = ()) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: _clean(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if console_keys:
            parts = [f"step {step}"] + [_fmt(k, record[k]) for k in console_keys if k in record]
            print(" | ".join(parts), flush=True)
        if self.wandb is not None:
            try:
                self.wandb.log(metrics, step=step)
            except Exception as e:  # noqa: BLE001 - tracking must never stop training
                warnings.warn(f"W&B logging failed, continuing with metrics.jsonl only: {e}")
                self.wandb = None

    def close(self) -> None:
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"W&B finish failed: {e}")


def _start_wandb(cfg: LogConfig, run_dir: Path, name: str, config: dict, run_id: str | None):
    try:
        import wandb
    except ImportError:
        warnings.warn("log.wandb is set but wandb is not installed (pip install 'lvmtrain[wandb]'); "
                      "logging to metrics.jsonl only")
        return None
    try:
        return wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=name, id=run_id,
                          resume="allow", config=config, dir=str(run_dir), mode=cfg.wandb)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"W&B could not start ({e}); logging to metrics.jsonl only")
        return None


def _clean(v):
    v = float(v) if not isinstance(v, (int, str)) else v
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _fmt(key: str, value) -> str:
    if isinstance(value, float):
        return f"{key} {value:.4g}" if abs(value) < 1e4 else f"{key} {value:.0f}"
    return f"{key} {value}"


def print0(*args, enabled: bool = True) -> None:
    if enabled:
        print(*args, file=sys.stdout, flush=True)
