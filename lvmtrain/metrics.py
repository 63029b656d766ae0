"""What a run reports: `metrics.jsonl`, Weights & Biases and the console, all from rank 0; and
the measurements behind them (phase timings, MFU against the device's peak, memory).

W&B missing, offline or failing never stops training: one warning, and local logging goes on.
A step is logged once, the first time it is trained: a run resumed from an earlier checkpoint
than its last logged step does not log the replayed steps again, in `metrics.jsonl` or in W&B.
"""

from __future__ import annotations

import json
import math
import resource
import secrets
import string
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from lvmtrain.config.schema import LogConfig

# Dense peak TFLOP/s of one GPU (vendor datasheets; sparsity not counted), by matmul precision.
# fp32 is the plain (non-TF32) rate: torch leaves TF32 off for matmuls unless asked.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def is_headline(key: str) -> bool:
    """An evaluation set's headline score (eval/NAME/top1, or retrieval's recall@1 both ways):
    shown on the console and plotted by `lvmtrain report`."""
    return key.startswith("eval/") and key.endswith(("/top1", "/t2i_R@1", "/i2t_R@1"))


def due(step: int, every: int, total: int) -> bool:
    """Is it time to log, evaluate or save? Every `every` steps (0: never), and at the last step."""
    return step == total or (every > 0 and step % every == 0)


class MetricLogger:
    def __init__(self, cfg: LogConfig, run_dir: Path, *, enabled: bool, run_name: str, config: dict,
                 total_steps: int, start_step: int = 0, wandb_id: str | None = None):
        self.cfg = cfg
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        self.wandb_id = wandb_id
        self.logged_until = _last_logged_step(self.path) if enabled else 0
        self.progress = Progress(cfg.progress, total_steps, start_step) if enabled else None
        if enabled and cfg.wandb != "disabled":
            self.wandb = _start_wandb(cfg, run_dir, run_name, config, wandb_id)
            if self.wandb is not None:
                self.wandb_id = self.wandb.id
                self._backfill_wandb(run_dir)

    def log(self, step: int, metrics: dict[str, float], *, console_keys: tuple[str, ...] = ()) -> None:
        if not self.enabled or step <= self.logged_until:
            return
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: _clean(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if console_keys:
            self.progress.show(step, {k: record[k] for k in console_keys if k in record})
        self._to_wandb(record)

    def _to_wandb(self, record: dict) -> None:
        if self.wandb is not None:
            try:
                self.wandb.log({k: v for k, v in record.items() if k not in ("step", "time")}, step=record["step"])
            except Exception as e:  # noqa: BLE001 - tracking must never stop training
                self._wandb_failed("logging", e)

    def _backfill_wandb(self, run_dir: Path) -> None:
        """Give W&B the steps `metrics.jsonl` has and it lacks, in order, before training goes on.

        A killed process takes with it what wandb had not written yet (offline, everything since
        its last flush); a resumed W&B run would have a gap there. W&B's last step comes from its
        server (online) or from the run's earlier offline files (read with `wandb leet`)."""
        if self.wandb.starting_step:
            have = self.wandb.starting_step - 1
        else:
            have = _offline_history_until(run_dir / "wandb", self.wandb.id, exclude=Path(self.wandb.dir).parent)
            if have is None:
                return  # unknown: logging again could repeat steps; leave the gap
        for record in read_records(self.path):
            if record["step"] > have:
                self._to_wandb(record)

    def advance(self, step: int) -> None:
        """Every step: move the progress bar."""
        if self.enabled:
            self.progress.advance(step)

    def log_checkpoint(self, path: Path, step: int) -> None:
        """The final checkpoint as a W&B artifact (`log.wandb_checkpoint`)."""
        if self.wandb is None or self.cfg.wandb_checkpoint == "none":
            return
        try:
            import wandb

            artifact = wandb.Artifact(f"{self.wandb.name or self.wandb.id}-checkpoint".replace("/", "-"),
                                      type="model", metadata={"step": step, "path": str(path)})
            if self.cfg.wandb_checkpoint == "upload":
                artifact.add_dir(str(path))
            else:  # NOTE: no checksum: it would read every byte of a multi-GB checkpoint
                artifact.add_reference(path.resolve().as_uri(), checksum=False)
            self.wandb.log_artifact(artifact, aliases=["latest", f"step_{step}"])
        except Exception as e:  # noqa: BLE001
            self._wandb_failed("the checkpoint artifact", e)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as e:  # noqa: BLE001
                self._wandb_failed("finishing", e)

    def _wandb_failed(self, what: str, error: Exception) -> None:
        warn(f"W&B {what} failed ({error}); continuing with {self.path} only")
        self.wandb = None


def _start_wandb(cfg: LogConfig, run_dir: Path, name: str, config: dict, run_id: str | None):
    """wandb's run on rank 0, or None. Online but unreachable: the same run, offline (one
    warning; `wandb sync` uploads it later), after wandb's `WANDB_INIT_TIMEOUT` (90 s by default)."""
    try:
        import wandb
    except ImportError:
        warn("log.wandb is set but wandb is not installed (pip install 'lvmtrain[wandb]'); "
             "logging to metrics.jsonl only")
        return None
    # NOTE: our own id, so that an offline fallback and every later resume continue one run.
    run_id = run_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    kwargs = dict(project=cfg.wandb_project, entity=cfg.wandb_entity, group=cfg.wandb_group,
                  tags=cfg.wandb_tags or None, name=name, id=run_id, resume="allow", config=config,
                  dir=str(run_dir))
    try:
        return wandb.init(mode=cfg.wandb, **kwargs)
    except Exception as e:  # noqa: BLE001
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if cfg.wandb == "online":
        try:
            wandb.teardown()  # NOTE: wandb's service still holds the failed run's id until then
            run = wandb.init(mode="offline", **kwargs)
            warn(f"W&B is unreachable ({reason}); logging W&B run {run_id} offline in {run_dir}/wandb "
                 f"(upload it later with `wandb sync`) and to metrics.jsonl")
            return run
        except Exception:  # noqa: BLE001, S110 - the warning below says it all
            pass
    warn(f"W&B could not start ({reason}); logging to {run_dir / 'metrics.jsonl'} only")
    return None


def read_records(path: Path) -> list[dict]:
    """The records of a `metrics.jsonl`; a line cut short by a kill is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill
    return records


def _last_logged_step(path: Path) -> int:
    return max((int(r["step"]) for r in read_records(path)), default=0)


def _offline_history_until(wandb_dir: Path, run_id: str, exclude: Path) -> int | None:
    """The last step in the newest earlier offline file of this W&B run that holds any history
    (0 when there is none); None when they cannot be read."""
    files = [f for f in sorted(wandb_dir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"), reverse=True)
             if f.parent != exclude]
    reader = Path(sys.executable).parent / "wandb"
    for f in files:
        try:
            proc = subprocess.run([str(reader), "leet", "inspect", "--json", str(f)], capture_output=True,
                                  text=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return None
        # NOTE: a killed writer can leave a last record cut short: the records before it still count
        steps = []
        for line in proc.stdout.splitlines():
            if '"type":"history"' in line:
                try:
                    steps.append(json.loads(line)["history"]["item"].get("_step", 0))
                except (ValueError, KeyError):
                    break
        if steps:
            return max(steps)
        if proc.returncode != 0:
            return None
    return 0


class Progress:
    """Rank 0's console: a tqdm bar on a terminal, or a plain line per logging step (with ETA)."""

    def __init__(self, mode: str, total: int, start: int):
        self.total, self.start, self.t0 = total, start, time.perf_counter()
        self.bar = None
        if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def show(self, step: int, values: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: _short(v) for k, v in values.items()}, refresh=False)
            if any(k.startswith("eval/") for k in values):
                self.bar.write(" | ".join([f"step {step}"] + [_fmt(k, v) for k, v in values.items()]))
            return
        parts = [f"step {step}/{self.total}"] + [_fmt(k, v) for k, v in values.items()]
        done = step - self.start
        if 0 < done and step < self.total:
            parts.append(f"eta {_duration((time.perf_counter() - self.t0) / done * (self.total - step))}")
        print(" | ".join(parts), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StepTimer:
    """Time spent in named phases of the training step, summed over a logging window.

    On CUDA the phases are timed with events, read only when the window is read (no
    synchronisation per step); on CPU with the wall clock. `add` takes host time measured by the
    caller (the wait for data).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self.events: list[tuple[str, object, object]] = []

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.totals[name] += time.perf_counter() - t0

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] += seconds

    def read(self) -> dict[str, float]:
        """Seconds per phase since the last read; starts a new window."""
        if self.events:
            torch.cuda.synchronize()
            for name, start, end in self.events:
                self.totals[name] += start.elapsed_time(end) / 1000
        totals, self.totals, self.events = dict(self.totals), defaultdict(float), []
        return totals


def device_peak_flops(device: torch.device, precision: str, override_tflops: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device for the run's matmul precision, where the number comes from).
    0 when unknown: MFU is then not reported."""
    if override_tflops > 0:
        return override_tflops * 1e12, "log.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        kind = "tf32" if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32 else precision
        known = gpu_peak_tflops(name, kind)
        if known is None:
            warn(f"no peak FLOP/s known for '{name}': set log.peak_tflops to report MFU")
            return 0.0, "unknown"
        return known[1] * 1e12, f"{known[0]} {kind} datasheet"
    return measure_matmul_flops(torch.float32 if precision == "fp32" else torch.bfloat16), "measured matmul"


def gpu_peak_tflops(device_name: str, kind: str) -> tuple[str, float] | None:
    """(table entry, dense peak TFLOP/s) for a CUDA device name such as "NVIDIA H100 80GB HBM3"."""
    for gpu, peaks in PEAK_TFLOPS.items():  # NOTE: ordered so "H100 PCIe" is matched before "H100"
        if all(part in device_name for part in gpu.split()):
            return gpu, peaks[kind]
    return None


def measure_matmul_flops(dtype: torch.dtype, size: int | None = None, repeats: int = 3) -> float:
    """Best-of-`repeats` FLOP/s of a square matmul on the CPU with this process's threads."""
    size = size or (1024 if dtype == torch.float32 else 256)  # bf16 has no hardware support on most CPUs
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak memory of this rank: CUDA's max allocated and reserved, or the process's peak RSS."""
    if device.type == "cuda":
        return {"mem/max_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "mem/max_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"mem/peak_rss_gb": peak_kb / 2**20}


def _clean(v):
    v = float(v) if not isinstance(v, (int, str)) else v
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _fmt(key: str, value) -> str:
    return f"{key} {_short(value)}"


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def warn(message: str) -> None:
    """A warning on stderr, in the form every lvmtrain warning takes (one line, greppable)."""
    print(f"lvmtrain: warning: {message}", file=sys.stderr, flush=True)


def print0(*args, enabled: bool = True) -> None:
    if enabled:
        print(*args, file=sys.stdout, flush=True)
