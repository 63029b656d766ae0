"""Check lvmtrain on this machine's GPUs: train a few dozen steps under every backend and precision
it can, through the real CLI, and print one table.

    python benchmarks/gpu_check.py [--gpus N] [--cases plain,fsdp,...] [--data SPEC] [--vs-open-clip]
    python benchmarks/gpu_check.py --cpu        # the same machinery on the CPU: tiny model, fp32

Makes its own synthetic shards (256 px JPEGs, captions, labels) under --out unless --data is given.
Each case is `python -m lvmtrain train CONFIG k=v ...` in its own process (multi-rank backends under
`torchrun --standalone`, FSDP2 and ZeRO even on one GPU), in its own run directory, bounded by a
per-case timeout and by what is left of --budget-s (a case that no longer fits is skipped). Per case
the table gives: samples/s, MFU, data-wait share (medians over the logged windows after the first,
which holds the warm-up and compilation), peak memory, last loss, and ok or the first error line.
Full logs: OUT/logs/CASE.log (the command that ran is its first line); the table also goes to
OUT/gpu_check.json and OUT/gpu_check.md. --vs-open-clip adds the model step (synthetic tensors, same
AdamW) of our CLIP against open_clip's of the same preset, and the measured matmul peak.

Cases (--cases picks some): plain, compile_blocks, compile_model, grad_ckpt, async_save, plain_fp16
run one process on one GPU; ddp (2+ GPUs), fsdp, zero1, zero2, zero3, zero2_fp16, zero3_meta (meta_init,
optimizer offload), siglip_flip and siglip_fsdp (SigLIP's ring loss with patch dropout 0.5 and 2
micro-batches, under DDP / FSDP2), mae_fsdp, dino_fsdp and dino_zero3 (self-supervised ViT-B/16, their own
configs) run on --gpus ranks; health (a NaN step skipped on the device, a profile) on one;
resume continues async_save's run (else plain's) from its last checkpoint to more steps and checks
that it did; zero_resume continues zero3's run the same way under ZeRO-2 (the partitions' ranges
written by one stage, read by the other). --cpu leaves out the fp16 cases and, unless named, the compile ones. `--set KEY=VALUE`
adds a config override to every case.

Exit code: 0 when no case failed (skipped cases, e.g. ddp on one GPU, DeepSpeed not installed, or
out of budget, are not failures), 1 when any case failed, 2 when refused (no CUDA without --cpu,
bad arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import json
import math
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# name: (overrides, runs under torchrun on every rank)
CASES = {
    "plain": ([], False),
    "ddp": ([], True),
    "fsdp": (["parallel.backend=fsdp"], True),
    "zero1": (["parallel.backend=deepspeed", "parallel.zero_stage=1"], True),
    "zero2": (["parallel.backend=deepspeed", "parallel.zero_stage=2"], True),
    "zero3": (["parallel.backend=deepspeed", "parallel.zero_stage=3"], True),
    "compile_blocks": (["parallel.compile=blocks"], False),
    "grad_ckpt": (["model.grad_checkpointing=1"], False),
    "async_save": (["checkpoint.async_save=true"], False),  # + checkpoint.every = half the steps
    "resume": ([], False),  # continues async_save's (else plain's) run for more steps
    # continues zero3's run under ZeRO-2: each rank reads its ranges of what ZeRO-3's ranks wrote
    "zero_resume": (["parallel.backend=deepspeed", "parallel.zero_stage=2"], True),
    "plain_fp16": (["train.precision=fp16"], False),
    "zero2_fp16": (["parallel.backend=deepspeed", "parallel.zero_stage=2", "train.precision=fp16"], True),
    "zero3_meta": (["parallel.backend=deepspeed", "parallel.zero_stage=3", "parallel.meta_init=true",
                    "parallel.offload_optimizer=true"], True),
    "compile_model": (["parallel.compile=model"], False),
    # SigLIP's ring (P2P between ranks: NCCL on GPUs) with FLIP patch dropout, the gradient cache
    # (2 micro-batches) under DDP and under FSDP2
    "siglip_flip": (["train.task=siglip", "model.patch_dropout=0.5", "train.grad_accum_steps=2"], True),
    "siglip_fsdp": (["train.task=siglip", "model.patch_dropout=0.5", "train.grad_accum_steps=2",
                     "parallel.backend=fsdp"], True),
    # self-supervised ViTs (their own configs, SSL_CONFIGS): MAE's encoder and decoder units, DINO's
    # multi-crop loader, teacher EMA on FSDP2 shards and on ZeRO-3 partitions
    "mae_fsdp": (["parallel.backend=fsdp"], True),
    "dino_fsdp": (["parallel.backend=fsdp"], True),
    "dino_zero3": (["parallel.backend=deepspeed", "parallel.zero_stage=3"], True),
    # training health on the device: a NaN step dropped by the fused AdamW's found_inf (no host
    # sync), a profile with a CUDA memory snapshot of steps 3-4
    "health": (["health.on_nan=skip", "health.inject_nan_at=5", "health.profile_steps=[3,4]"], False),
}
RESUMES = {"resume": ("async_save", "plain"), "zero_resume": ("zero3",)}  # a case: the runs it may continue
SSL_CONFIGS = {"mae_fsdp": "configs/mae_vit_b16.yaml", "dino_fsdp": "configs/dino_vit_b16.yaml",
               "dino_zero3": "configs/dino_vit_b16.yaml"}
# --cpu: the SSL cases on the tiny ViT with a small DINO head and 2 local crops
SSL_CPU = ["model.name=vit_debug", "ssl.out_dim=1024", "ssl.head_hidden=256", "ssl.local_crops=2"]
# --cpu: the tiny preset at 32 px, fp32, few short windows; (shards, samples each, image px) to write
DEFAULTS = {
    "gpu": dict(model="clip_b16", batch_size=256, steps=40, log_every=10, precision="bf16", case_timeout_s=180,
                min_case_s=30, shards=(48, 1000, 256)),
    "cpu": dict(model="clip_debug", batch_size=16, steps=8, log_every=2, precision="fp32", case_timeout_s=150,
                min_case_s=15, shards=(4, 64, 64)),
}
WORDS = ("dog cat car tree house river boat plane bird flower mountain street chair table lamp window "
         "beach forest city bridge horse train bicycle phone book cup clock shoe hat").split()
ERROR = re.compile(r"\b[A-Z]\w*(?:Error|Exception)\b(?<!ChildFailedError): .*")


def write_shard(task: tuple) -> None:
    """One tar in img2dataset's layout: smooth random colour fields with noise, so the JPEGs are
    about as large as photos (15-25 kB at 256 px) and decoding costs what it costs on real data."""
    import cv2
    import numpy as np

    path, seed, n, size = task
    rng = np.random.default_rng(seed)
    with tarfile.open(path + ".partial", "w") as tar:
        for i in range(n):
            img = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (size, size),
                             interpolation=cv2.INTER_CUBIC)
            img = np.clip(img.astype(np.int16) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
            cls = int(rng.integers(0, len(WORDS)))
            caption = f"a photo of a {WORDS[cls]} near a {WORDS[int(rng.integers(0, len(WORDS)))]}"
            files = {"jpg": cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes(),
                     "txt": caption.encode(), "cls": str(cls).encode()}
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{seed:05d}{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    os.replace(path + ".partial", path)


def make_shards(out: Path, shards: int, per_shard: int, size: int) -> str:
    """Write (or reuse, when a previous check wrote the same ones) synthetic shards; their spec.

    Not `lvmtrain data build`: it packs image files that already exist, and writing 48,000 JPEGs
    to a folder first would double the disk traffic for nothing."""
    marker, want = out / "shards.json", {"shards": shards, "per_shard": per_shard, "size": size}
    spec = f"{out}/{{00000..{shards - 1:05d}}}.tar"
    if marker.exists() and json.loads(marker.read_text()) == want:
        return spec
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tasks = [(f"{out}/{s:05d}.tar", s, per_shard, size) for s in range(shards)]
    # NOTE: fork, as lvmtrain's own shard writer: the workers touch no torch or CUDA state.
    with multiprocessing.get_context("fork").Pool(min(shards, os.cpu_count() or 1)) as pool:
        pool.map(write_shard, tasks)
    marker.write_text(json.dumps(want))
    return spec


def descendants(pid: int) -> list[int]:
    """Every process below `pid`: torchrun starts its ranks in new sessions, and the ranks their
    loader workers, so killing a process group would leave them running on the GPUs."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def run_bounded(cmd: list[str], log: Path, timeout: float) -> tuple[int | None, float]:
    """Run `cmd` with stdout and stderr in `log`; (exit code or None on timeout, seconds). On
    timeout the whole process tree is killed, so the next case finds the GPUs free."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in [proc.pid, *descendants(proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, time.perf_counter() - t0


def error_line(log: Path) -> str:
    """The most telling line of a failed run's output: lvmtrain's own one-line error if there is
    one, else the last `SomethingError: ...` (torchrun's ChildFailedError summary says nothing),
    else the last line."""
    lines = log.read_text(errors="replace").splitlines()[1:]
    ours = [line for line in lines if line.startswith("lvmtrain: error:")]
    found = ours or [m.group(0) for line in lines if (m := ERROR.search(line))]
    return (found or [line for line in lines if line.strip()] or ["no output"])[-1]


def summarize(run_dir: Path, after_step: int = 0) -> dict:
    """Medians over the logged windows after the first (warm-up, compilation), the largest peak
    memory and the last loss, from the run's `metrics.jsonl`."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    rows = [r for r in rows if "samples_per_s" in r and r["step"] > after_step]
    if not rows:
        return {}
    windows = rows[1:] or rows
    med = lambda key: statistics.median(r[key] for r in windows) if key in windows[0] else None  # noqa: E731
    mem = [r.get("mem/max_allocated_gb", r.get("mem/peak_rss_gb")) for r in rows]
    return {"samples_per_s": med("samples_per_s"), "mfu": med("mfu"), "data_wait_share": med("data_wait_share"),
            "peak_mem_gb": max((m for m in mem if m is not None), default=None), "last_loss": rows[-1].get("loss"),
            "last_step": rows[-1]["step"]}


def loader_workers(args, ranks: int) -> int:
    """--workers, else the cores each rank can have, less one for the rank and one for the rest."""
    return args.workers or max(1, min(16, (os.cpu_count() or 1) // ranks - 2))


def shm_warning(args) -> str | None:
    """Loader workers hand batches over in /dev/shm (a ring of 8 per worker); a container's 64 MB
    default ends the first case in a bus error that is hard to read, so say so up front."""
    need = args.gpus * loader_workers(args, args.gpus) * 8 * args.batch_size * args.image_size**2 * 3
    free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else need
    if free < need:
        return (f"gpu_check: warning: /dev/shm has {free / 2**30:.1f} GiB free, the loaders may take "
                f"{need / 2**30:.1f} GiB; enlarge it (docker --shm-size, or as root: mount -o remount,size=48G "
                "/dev/shm) or pass --workers fewer")
    return None


def skip_reason(name: str, args, ranks: int, results: dict) -> str | None:
    """Why `name` cannot run here (None: it can). A skip is not a failure."""
    if name == "ddp" and ranks < 2:
        return "needs 2+ ranks" + ("" if args.cpu else " (GPUs)")
    if "zero" in name and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed not installed (pip install 'lvmtrain[deepspeed]')"
    if args.cpu and name.endswith("_fp16"):
        return "fp16 is for GPUs (--cpu checks fp32; DeepSpeed has no fp16 on CPU)"
    if args.cpu and name.startswith("compile") and not args.cases:
        return "a cold torch.compile costs 20-50 s on CPU: select it with --cases"
    if name in RESUMES and not any(results.get(s, {}).get("status") == "ok" for s in RESUMES[name]):
        return f"needs {' or '.join(RESUMES[name])} to have run ok first"
    return None


def run_case(name: str, args, spec: str, results: dict, deadline: float) -> dict:
    """One case through the CLI, its checks, and its row of the table."""
    overrides, multi = CASES[name]
    ranks = args.gpus if multi else 1
    row = {"case": name, "ranks": ranks, "status": "ok", "seconds": 0.0}
    if reason := skip_reason(name, args, ranks, results):
        return {**row, "status": f"skipped: {reason}"}
    left = deadline - time.monotonic()
    if left < min(args.min_case_s, args.case_timeout_s):
        return {**row, "status": f"skipped: {max(0, int(left))} s left of --budget-s {args.budget_s:g}"}
    timeout, budget_cut = min(args.case_timeout_s, left), left < args.case_timeout_s  # cut short: not judged
    run_dir, steps, after = args.out / "runs" / name, args.steps, 0
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = list(overrides)
    if name == "async_save":
        overrides.append(f"checkpoint.every={max(1, args.steps // 2)}")
    if name in RESUMES:  # a copy of the source run (its newest checkpoint only), so each case keeps its own
        source = next(s for s in RESUMES[name] if results.get(s, {}).get("status") == "ok")
        latest = (args.out / "runs" / source / "checkpoints" / "latest").read_text().strip()
        shutil.copytree(args.out / "runs" / source, run_dir,
                        ignore=lambda _, names: [n for n in names if n.startswith("step_") and n != latest])
        after, steps = args.steps, args.steps + max(2 * args.log_every, args.steps // 2)
        row["note"] = f"resumes {source} at step {after}"
    config = "configs/vit_b16.yaml" if args.model.startswith("vit") else "configs/clip_vit_b16.yaml"
    fixed = args.fixed
    if name in SSL_CONFIGS:  # a ViT, whatever --model says; no text tower to cut
        config = SSL_CONFIGS[name]
        fixed = [f for f in fixed if not f.startswith("model.context_length=")] + ["eval.sets=[]"] + \
            (SSL_CPU if args.cpu else ["model.name=vit_b16"])
    common = [f"model.name={args.model}", f"data.train={spec}", "data.val=", f"data.batch_size={args.batch_size}",
              f"data.workers={loader_workers(args, ranks)}", f"train.steps={steps}", "train.epochs=0",
              f"train.precision={args.precision}", f"log.every={args.log_every}", f"log.dir={args.out / 'runs'}",
              f"run.name={name}", "log.wandb=disabled", "log.progress=lines",
              f"optim.warmup_steps={max(1, args.steps // 4)}", *fixed]
    launcher = [sys.executable]
    if multi:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    cmd = [*launcher, "-m", "lvmtrain", "train", config, *common, *overrides, *args.set]
    log = args.out / "logs" / f"{name}.log"
    rc, row["seconds"] = run_bounded(cmd, log, timeout)
    row.update(summarize(run_dir, after))
    row["run_dir"], row["log"] = str(run_dir), str(log)
    if rc is None:
        row["status"] = (f"skipped: --budget-s ran out {timeout:.0f} s into the case" if budget_cut else
                         f"timed out after {timeout:.0f} s; last: {error_line(log).strip()}")
    elif rc != 0:
        row["status"] = f"exit {rc}: {error_line(log)}"
    elif "samples_per_s" not in row:
        row["status"] = "no metrics logged in metrics.jsonl"
    elif row["last_loss"] is None or not math.isfinite(row["last_loss"]):
        row["status"] = f"loss is not finite: {row['last_loss']}"
    elif name in RESUMES and not (re.search(rf"resumed from \S+ at step {after}\b", log.read_text())
                                   and row["last_step"] == steps):
        row["status"] = f"did not continue from step {after} to {steps} (no 'resumed from ... at step {after}')"
    return row


def vs_open_clip(args, deadline: float) -> tuple[list[dict], list[str]]:
    """The model-step rows, from a bounded subprocess of this script; and notes for the table."""
    if not args.model.startswith("clip"):
        return [{"case": "step_open_clip", "status": "skipped: open_clip compares clip_* presets"}], []
    left = deadline - time.monotonic()
    if left < min(args.min_case_s, args.case_timeout_s):
        return [{"case": "step_open_clip", "status": "skipped: no time left of --budget-s"}], []
    timeout = min(args.case_timeout_s, left)
    # NOTE: the project's one model-step comparison, in its own process (its memory is freed
    # before the training cases)
    cmd = [sys.executable, str(REPO / "benchmarks" / "step_vs_open_clip.py"), "--json", "--model", args.model,
           "--batch", str(args.batch_size), "--precision", args.precision, "--device", "cpu" if args.cpu else "cuda",
           "--steps", "3" if args.cpu else "20"]
    if args.image_size:
        cmd += ["--image-size", str(args.image_size)]
    log = args.out / "logs" / "vs_open_clip.log"
    rc, seconds = run_bounded(cmd, log, timeout)
    out = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    rows = [{"ranks": 1, "seconds": seconds, "log": str(log), **r} for r in out if "case" in r]
    if rc != 0:  # the failure goes to the model whose row is missing
        failure = (f"exit {rc}: {error_line(log)}" if rc is not None else "skipped: --budget-s ran out"
                   if left < args.case_timeout_s else f"timed out after {timeout:.0f} s")
        missing = next(c for c in ("step_ours", "step_open_clip", "vs_open_clip") if c not in {r["case"] for r in rows})
        rows.append({"case": missing, "ranks": 1, "status": failure, "log": str(log)})
    peak = next((r["peak_tflops"] for r in out if "peak_tflops" in r), {})
    note = f"matmul peak measured {peak['measured']:.3g} TFLOP/s ({args.precision})" if peak else ""
    speed = {r["case"]: r for r in rows if r.get("status") == "ok"}
    if len(speed) == 2:
        ours, theirs = speed["step_ours"], speed["step_open_clip"]
        note += (f"; model step ours / open_clip: {ours['samples_per_s'] / theirs['samples_per_s']:.2f}x "
                 f"samples/s ({ours['params']:,} / {theirs['params']:,} parameters)")
    return rows, [note] * bool(note)


def image_size(model: str) -> int:
    from lvmtrain.models.registry import get_preset

    preset = get_preset(model)
    return getattr(preset, "vision", preset).image_size


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict], width: int | None = 110) -> list[tuple]:
    """The table's cells, one tuple per row; error lines cut to `width` for the console."""
    head = ("case", "ranks", "samples/s", "MFU", "data wait", "peak GB", "last loss", "secs", "result")
    cells = [(r["case"], str(r.get("ranks", "")), fmt(r.get("samples_per_s"), ",.1f"), fmt(r.get("mfu"), ".3f"),
              fmt(r.get("data_wait_share"), ".1%"), fmt(r.get("peak_mem_gb"), ".2f"),
              fmt(r.get("last_loss"), ".4f"), fmt(r.get("seconds"), ".0f"), r["status"][:width]) for r in rows]
    return [head, *cells]


def report(rows: list[dict], meta: dict, notes: list[str], out: Path) -> None:
    """Print the fixed-width table; write it as JSON and as markdown (with the machine at the top,
    ready to paste into the README)."""
    cells = table(rows)
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    for c in cells:
        print("  ".join(v.ljust(w) if i in (0, len(c) - 1) else v.rjust(w)
                        for i, (v, w) in enumerate(zip(c, widths))).rstrip())
    print("\n" + "\n".join(notes))
    (out / "gpu_check.json").write_text(json.dumps({"meta": meta, "cases": rows, "notes": notes}, indent=2))
    md = [f"gpu_check {meta['date']}: {meta['device']}, torch {meta['torch']}, lvmtrain {meta['commit']}; "
          f"{meta['model']} @ {meta['image']} px, batch {meta['batch_size']} per rank, {meta['precision']}, "
          f"{meta['steps']} steps, data {meta['data']}", ""]
    cells = table(rows, width=300)
    md += ["| " + " | ".join(c) + " |" for c in cells[:1]] + ["|" + "---|" * len(cells[0])]
    md += ["| " + " | ".join(v.replace("|", "\\|") for v in c) + " |" for c in cells[1:]]
    (out / "gpu_check.md").write_text("\n".join(md + [""] + notes) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--cpu", action="store_true", help="run on the CPU: tiny model, fp32, short runs")
    p.add_argument("--gpus", type=int, default=0, help="ranks of the multi-rank cases (default: every visible "
                   "GPU; 1 with --cpu)")
    for flag, kind, what in (("--model", str, "preset (lvmtrain models)"), ("--batch-size", int, "per rank"),
                             ("--steps", int, "per case"), ("--log-every", int, "steps per metrics window"),
                             ("--precision", str, "bf16, fp16 or fp32"),
                             ("--case-timeout-s", float, "seconds per case")):
        key = flag[2:].replace("-", "_")
        p.add_argument(flag, type=kind, help=f"{what} (default {DEFAULTS['gpu'][key]}, "
                       f"{DEFAULTS['cpu'][key]} with --cpu)")
    p.add_argument("--image-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--workers", type=int, default=0, help="loader workers per rank (default: cores / ranks - 2, <= 16)")
    p.add_argument("--data", default=None, help="shard spec to train on instead of synthetic shards (quote the braces)")
    p.add_argument("--cases", default=None, help=f"comma list of: {','.join(CASES)} (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every case, e.g. --set parallel.bucket_mb=50 (repeatable)")
    p.add_argument("--out", type=Path, default=Path("/tmp/lvmtrain-gpu-check"), help="run dirs, logs, shards, tables")
    p.add_argument("--budget-s", type=float, default=480, help="total seconds, shards included (default 480)")
    p.add_argument("--vs-open-clip", action="store_true", help="add the model step against open_clip's CLIP")
    args = p.parse_args()
    cpu = args.cpu
    for key, value in DEFAULTS["cpu" if cpu else "gpu"].items():
        setattr(args, key, getattr(args, key, None) or value)
    args.fixed = [f"model.image_size={args.image_size}"] if args.image_size else []  # overrides of every case
    if cpu:  # on the CPU even where there are GPUs; the tiny text tower cut to 16 tokens (captions are 9)
        args.fixed += ["parallel.device=cpu"] + ["model.context_length=16"] * args.model.startswith("clip")
    selected = args.cases.split(",") if args.cases else list(CASES)
    if unknown := [c for c in selected if c not in CASES]:
        p.error(f"--cases: unknown {','.join(unknown)}; valid: {','.join(CASES)}")
    if args.precision not in ("bf16", "fp16", "fp32") or any("=" not in s for s in args.set):
        p.error("--precision takes bf16, fp16 or fp32; --set takes KEY=VALUE")
    try:
        args.image_size = args.image_size or image_size(args.model)
    except ValueError as e:
        p.error(f"--model: {e}")

    import torch

    if not cpu and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device visible to torch {torch.__version__}; run it on a GPU machine, "
              "or pass --cpu to check the same machinery on the CPU (tiny model, fp32)", file=sys.stderr)
        return 2
    visible = 0 if cpu else torch.cuda.device_count()
    args.gpus = args.gpus or (1 if cpu else visible)
    if not cpu and args.gpus > visible:
        print(f"gpu_check: --gpus {args.gpus} but {visible} GPUs visible", file=sys.stderr)
        return 2
    if warning := shm_warning(args):
        print(warning, file=sys.stderr)
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    for sub in ("logs", "runs"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    device = "CPU" if cpu else f"{args.gpus} x {torch.cuda.get_device_name()}"
    spec = args.data or make_shards(args.out / "shards", *args.shards)
    print(f"gpu_check: {device}, torch {torch.__version__}; {args.model} @ {args.image_size} px, batch "
          f"{args.batch_size} per rank, {args.precision}, {args.steps} steps per case; data {spec} ready after "
          f"{time.monotonic() - t0:.0f} s; logs in {args.out / 'logs'}", flush=True)
    rows, notes = vs_open_clip(args, deadline) if args.vs_open_clip else ([], [])
    results: dict[str, dict] = {}
    for name in (c for c in CASES if c in selected):
        results[name] = row = run_case(name, args, spec, results, deadline)
        rows.append(row)
        print(f"  {name}: {row['status'][:160]} ({row['seconds']:.0f} s)", flush=True)
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device,
            "torch": torch.__version__, "commit": commit.stdout.strip() or "unknown", "model": args.model,
            "image": args.image_size, "batch_size": args.batch_size, "precision": args.precision,
            "steps": args.steps, "data": spec, "seconds": round(time.monotonic() - t0, 1)}
    notes.append(f"{meta['seconds']:.0f} s in all; medians over the metrics windows after the first; MFU against "
                 + ("a measured matmul" if cpu else "the datasheet peak"))
    report(rows, meta, notes, args.out)
    failed = [r["case"] for r in rows if r["status"] != "ok" and not r["status"].startswith("skipped")]
    if failed:
        print(f"gpu_check: {len(failed)} failed: {', '.join(failed)} (logs in {args.out / 'logs'})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
