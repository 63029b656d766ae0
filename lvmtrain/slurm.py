"""`lvmtrain submit`: fill in `slurm/train.sbatch`'s options from a few flags and submit it.

The config and overrides are loaded first, so a wrong key is refused before the job waits in the
queue. The job's run directory is `log.dir/JOB_NAME-JOB_ID` (the batch script sets `run.name`
unless an override names it) and Slurm's log goes to `log.dir/slurm/JOB_NAME-JOB_ID.out`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lvmtrain.config.schema import ConfigError

# NOTE: the template lives in the repository (slurm/), not in the package: sbatch copies the
# script at submission, so only the submitting machine needs it.
DEFAULT_SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch"


@dataclass
class JobSpec:
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None
    sbatch_args: list[str] = field(default_factory=list)
    script: Path = DEFAULT_SCRIPT


def sbatch_command(config: str, overrides: list[str], spec: JobSpec) -> list[str]:
    """The `sbatch` command line for a config (validated here, with its overrides)."""
    from lvmtrain.config.loader import load_config

    cfg = load_config(config, overrides)
    if not spec.script.is_file():
        raise ConfigError(f"batch script not found: {spec.script} (an installed package has no slurm/; "
                          f"pass --script path/to/train.sbatch from the lvmtrain repository)")
    if spec.nodes < 1:
        raise ConfigError(f"--nodes {spec.nodes}: need at least 1")
    if spec.gpus_per_node and spec.tasks_per_node not in (None, spec.gpus_per_node):
        raise ConfigError(f"--tasks-per-node {spec.tasks_per_node} with --gpus-per-node {spec.gpus_per_node}: "
                          f"lvmtrain runs one rank per GPU; leave --tasks-per-node out")
    tasks = spec.gpus_per_node or spec.tasks_per_node or 1
    name = spec.job_name or cfg.run.name
    if not re.fullmatch(r"[\w.+-]+", name):
        raise ConfigError(f"job name '{name}': use letters, digits and . _ + - (it names the run directory)")
    cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--nodes={spec.nodes}", f"--ntasks-per-node={tasks}",
           f"--output={Path(cfg.log.dir) / 'slurm' / '%x-%j.out'}",
           f"--export=ALL,LVMTRAIN_PYTHON={sys.executable}"]
    if spec.gpus_per_node:
        cmd.append(f"--gpus-per-node={spec.gpus_per_node}")
    for flag, value in (("--cpus-per-task", spec.cpus_per_task), ("--time", spec.time),
                        ("--partition", spec.partition), ("--account", spec.account)):
        if value is not None:
            cmd.append(f"{flag}={value}")
    return [*cmd, *spec.sbatch_args, str(spec.script), config, *overrides]


def submit(config: str, overrides: list[str], spec: JobSpec, *, dry_run: bool = False) -> str:
    """Submit the job; returns what to print (the job id, or the command under `dry_run`)."""
    cmd = sbatch_command(config, overrides, spec)
    if dry_run:
        return shlex.join(cmd)
    if shutil.which("sbatch") is None:
        raise ConfigError("sbatch not found: run `lvmtrain submit` on a Slurm login node (or use --dry-run)")
    log_dir = Path(next(a for a in cmd if a.startswith("--output=")).split("=", 1)[1]).parent
    log_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create it: the job would fail silently
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if proc.returncode != 0:
        raise ConfigError(f"sbatch refused the job ({proc.returncode}): {proc.stderr.strip()}\n  {shlex.join(cmd)}")
    return proc.stdout.strip().split(";")[0]
