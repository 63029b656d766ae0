"""benchmarks/gpu_check.py on the CPU: its refusal without CUDA, a passing run through the real CLI
(one process, DeepSpeed ZeRO-2 under torchrun, a resume, the model step against open_clip), and
how failed and skipped cases reach the table and the exit code."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, read_metrics

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def gpu_check(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def table_rows(stdout: str) -> dict[str, str]:
    """Printed table rows by case name (the first word of a row)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("case "))
    end = lines.index("", start)  # the notes follow a blank line
    return {line.split()[0]: line for line in lines[start + 1:end]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="refuses only where there is no CUDA")
def test_refuses_without_cuda_unless_cpu():
    proc = gpu_check()
    assert proc.returncode == 2
    assert proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert "CUDA" in line and "--cpu" in line


def test_cpu_run_through_the_cli_is_ok_and_reported(tmp_path):
    proc = gpu_check("--cpu", "--cases", "plain,zero3,resume,zero_resume", "--vs-open-clip", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout)
    assert list(rows) == ["step_ours", "step_open_clip", "plain", "zero3", "resume", "zero_resume"]
    for line in rows.values():
        assert line.endswith("  ok"), line
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    cases = {r["case"]: r for r in report["cases"]}
    assert list(cases) == list(rows)
    for name, r in cases.items():
        assert r["status"] == "ok" and r["samples_per_s"] > 0 and math.isfinite(r["last_loss"]), r
        assert f"{r['samples_per_s']:,.1f}" in rows[name]  # the table prints what the JSON holds
        if not name.startswith("step_"):
            assert 0 <= r["data_wait_share"] < 1 and r["peak_mem_gb"] > 0 and r["mfu"] > 0
    assert cases["zero3"]["ranks"] == 1 and "torch.distributed.run" in (tmp_path / "logs" / "zero3.log").read_text()
    # The resume continued plain's checkpoint at step 8, in a copy of its run directory, to step 12.
    assert cases["resume"]["note"] == "resumes plain at step 8"
    assert [m["step"] for m in read_metrics(tmp_path / "runs" / "resume")] == [2, 4, 6, 8, 10, 12]
    assert [m["step"] for m in read_metrics(tmp_path / "runs" / "plain")] == [2, 4, 6, 8]
    # ZeRO-3's partitions' ranges, read by ZeRO-2's
    assert cases["zero_resume"]["note"] == "resumes zero3 at step 8"
    assert [m["step"] for m in read_metrics(tmp_path / "runs" / "zero_resume")] == [2, 4, 6, 8, 10, 12]
    assert cases["step_ours"]["params"] == cases["step_open_clip"]["params"]
    assert any("ours / open_clip" in n for n in report["notes"])
    md = (tmp_path / "gpu_check.md").read_text()
    assert "CPU, torch " in md.splitlines()[0] and "| zero3 | 1 |" in md


def test_failed_case_exits_1_with_its_error_line(tmp_path):
    proc = gpu_check("--cpu", "--cases", "plain", "--set", "train.no_such_key=1", "--out", str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    row = table_rows(proc.stdout)["plain"]
    assert "exit 2: lvmtrain: error:" in row and "no_such_key" in row
    [case] = json.loads((tmp_path / "gpu_check.json").read_text())["cases"]
    assert case["status"].startswith("exit 2: lvmtrain: error:") and "no_such_key" in case["status"]
    assert "1 failed: plain" in proc.stderr
    assert "train.no_such_key=1" in (tmp_path / "logs" / "plain.log").read_text().splitlines()[0]


def test_skipped_cases_are_not_failures(tmp_path):
    # ddp needs two ranks; plain no longer fits in a 5 s budget.
    proc = gpu_check("--cpu", "--cases", "plain,ddp", "--budget-s", "5", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout)
    assert "skipped: needs 2+ ranks" in rows["ddp"] and "left of --budget-s 5" in rows["plain"]
