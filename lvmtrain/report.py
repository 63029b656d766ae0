"""`lvmtrain report RUN_DIR [RUN_DIR ...]`: PNG plots and a markdown summary of runs, from their
`metrics.jsonl` alone (no W&B needed); several runs are overlaid on the same axes."""

from __future__ import annotations

import statistics
from pathlib import Path

from lvmtrain.data.shards import DataError
from lvmtrain.metrics import is_headline, read_records

# (file stem, title, y label, metric keys plotted; the first one present is used per run; None:
# every evaluation score, one line per run and set)
PLOTS = [
    ("loss", "Training loss", "loss", ["loss"]),
    ("eval", "Evaluation", "top-1 / recall@1", None),
    ("lr", "Learning rate", "lr", ["lr"]),
    ("throughput", "Throughput", "samples/s (all devices)", ["samples_per_s"]),
    ("mfu", "Model FLOPs utilisation", "MFU", ["mfu"]),
    ("data_wait", "Share of step time waiting for data", "data-wait share", ["data_wait_share"]),
]


def read_run(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl; pass a run directory (log.dir/run.name)")
    records = read_records(path)
    if not records:
        raise DataError(f"{path}: empty; the run has not logged a step yet")
    return records


def labels(run_dirs: list[str]) -> list[str]:
    """Each run's name, with as many parent folders as it takes to tell runs apart."""
    paths = [Path(d).resolve() for d in run_dirs]
    for depth in range(1, max(len(p.parts) for p in paths) + 1):
        names = [str(Path(*p.parts[-depth:])) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def eval_keys(records: list[dict]) -> list[str]:
    """The headline score of each evaluation set (eval/NAME/top1, or its recall@1 both ways)."""
    return sorted({k for r in records for k in r if is_headline(k)})


def report(run_dirs: list[str], out: str | None = None) -> Path:
    """Write the PNGs and `report.md` to `out` (default: the first run's `report/`); returns it."""
    try:
        import matplotlib
    except ImportError:
        raise DataError("lvmtrain report draws with matplotlib: pip install 'lvmtrain[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {label: read_run(Path(d)) for label, d in zip(labels(run_dirs), run_dirs)}
    out_dir = Path(out) if out else Path(run_dirs[0]) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, title, ylabel, keys in PLOTS:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        drawn = False
        for name, records in runs.items():
            for key in keys or eval_keys(records):
                steps, values = series(records, key)
                if steps:
                    label = name if keys else f"{name} {key.removeprefix('eval/')}"
                    ax.plot(steps, values, label=label, marker="o" if len(steps) < 20 else None, linewidth=1.5)
                    if stem == "eval" and len(steps) <= 10:  # few points: their values, readable
                        for x, y in zip(steps, values):
                            ax.annotate(f"{y:.1%}", (x, y), textcoords="offset points", xytext=(0, 6),
                                        ha="center", fontsize="small")
                    drawn = True
                    if keys:
                        break
        if drawn:
            ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
            if stem == "lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
            fig.tight_layout()
            fig.savefig(out_dir / f"{stem}.png")
            written.append(stem)
        plt.close(fig)
    (out_dir / "report.md").write_text(summary(runs, written))
    return out_dir


def summary(runs: dict[str, list[dict]], plots: list[str]) -> str:
    lines = ["# Run report", "", "| run | steps | samples seen | final loss | evaluation | samples/s | MFU "
             "| data wait | wall time |", "|---|---|---|---|---|---|---|---|---|"]
    for name, records in runs.items():
        _, loss = series(records, "loss")
        finals = [(key, series(records, key)[1][-1]) for key in eval_keys(records)]
        _, speed = series(records, "samples_per_s")
        _, mfu = series(records, "mfu")
        _, wait = series(records, "data_wait_share")
        _, seen = series(records, "samples_seen")
        tail = loss[-max(1, len(loss) // 10):]  # the mean of the last tenth: one step is noisy
        wall = records[-1]["time"] - records[0]["time"] if len(records) > 1 else 0.0
        lines.append(" | ".join([
            f"| {name}", str(records[-1]["step"]), f"{int(seen[-1]):,}" if seen else "-",
            f"{statistics.fmean(tail):.4g}" if tail else "-", ", ".join(f"{k.removeprefix('eval/')} {v:.2%}" for k, v in finals) or "-",
            f"{statistics.median(speed):,.0f}" if speed else "-", f"{statistics.median(mfu):.1%}" if mfu else "-",
            f"{statistics.median(wait):.1%}" if wait else "-", f"{wall / 60:.1f} min |"]))
    lines += ["", "Medians over the logged steps; final loss is the mean of the last tenth of them.", ""]
    lines += [f"![{stem}]({stem}.png)" for stem in plots]
    return "\n".join(lines) + "\n"
