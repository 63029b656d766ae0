"""Shards written by the real img2dataset read back through `check_shards` and `ShardSet`.

img2dataset pins webdataset 0.2.x (we pin 1.0.2), so it runs from its own virtualenv, created
once in a cache directory and reused by later runs.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lvmtrain.data.build import load_demo_source
from lvmtrain.data.check import check_shards
from lvmtrain.data.shards import ShardSet
from lvmtrain.data.transforms import decode_rgb

N = 300

VENV = Path(os.environ.get("LVMTRAIN_IMG2DATASET_VENV",
                           Path.home() / ".cache" / "lvmtrain-tests" / "img2dataset-venv"))


def img2dataset_venv(venv: Path = VENV) -> tuple[Path | None, str]:
    """(path of the img2dataset executable, why not), creating the venv on first use."""
    exe = venv / "bin" / "img2dataset"
    done = venv / ".lvmtrain-complete"
    venv.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: a lock, and a marker written last, so a concurrent or interrupted install is never
    # taken for a finished one (the venv cannot be built elsewhere and moved: its scripts' #! lines
    # name its path).
    with open(venv.parent / (venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists() and exe.exists():
            return exe, ""
        shutil.rmtree(venv, ignore_errors=True)
        start = time.monotonic()
        steps = [[sys.executable, "-m", "venv", str(venv)],
                 [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", "img2dataset"]]
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                return None, f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout)[-800:]}"
        done.write_text(f"{time.monotonic() - start:.0f} s\n")
        return exe, ""


@pytest.fixture(scope="module")
def img2dataset_shards(tmp_path_factory) -> dict:
    """300 Fashion-MNIST PNGs listed as file:// URLs in a CSV, downloaded by img2dataset into 3 shards."""
    exe, why = img2dataset_venv()
    if exe is None:
        pytest.skip(f"img2dataset cannot be installed in {VENV}: {why}")
    base = tmp_path_factory.mktemp("img2dataset")
    _, classes, (x, y), _ = load_demo_source()
    (base / "img").mkdir()
    rows = {}
    with open(base / "list.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        for i in range(N):
            path = base / "img" / f"{i}.png"
            Image.fromarray(x[i]).save(path)
            rows[path.as_uri()] = (f"a photo of a {classes[y[i]]}, n°{i}", x[i])
            writer.writerow([path.as_uri(), rows[path.as_uri()][0]])
    out = base / "out"
    cmd = [str(exe), "--url_list", str(base / "list.csv"), "--input_format", "csv", "--url_col", "url",
           "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
           "--processes_count", "1", "--thread_count", "4", "--image_size", "32",
           "--number_sample_per_shard", "100", "--enable_wandb", "False"]
    # NOTE: albumentations asks the network for a newer version at import unless told not to
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run(cmd, cwd=base, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return {"spec": f"{out}/{{00000..00002}}.tar", "dir": out, "rows": rows}


def test_check_uses_img2dataset_stats(img2dataset_shards):
    report = check_shards(img2dataset_shards["spec"], world=2, workers=1, batch_size=50, decode_per_shard=8)
    assert report.problems == [] and report.ok == 3
    assert [s.count_source for s in report.shards] == [f"{i:05d}_stats.json" for i in range(3)]
    assert [s.stats_samples for s in report.shards] == [100, 100, 100]
    assert report.samples == N and report.steps_per_epoch == 3
    assert (report.decoded, report.bad) == (24, 0)
    assert not [w for w in report.warnings if "stale" in w]


def test_shardset_reads_every_img2dataset_sample(img2dataset_shards):
    shards = ShardSet.from_spec(img2dataset_shards["spec"])
    assert len(shards) == N
    rows, seen, out_of_order = img2dataset_shards["rows"], set(), 0
    for shard in range(len(shards.urls)):
        names = [m for m in tarfile.open(shards.urls[shard]).getnames() if not m.startswith("_")]
        keys_in_tar_order = list(dict.fromkeys(n.split(".")[0] for n in names))
        out_of_order += keys_in_tar_order != sorted(keys_in_tar_order)
    for i in range(len(shards)):
        url, sample, _ = shards.sample(i)
        # every member of a key lands in one sample, however the tar interleaves them
        assert sorted(sample.files) == ["jpg", "json", "txt"], sample
        with open(url, "rb") as f:
            read = {}
            for ext, (offset, size) in sample.files.items():
                f.seek(offset)
                read[ext] = f.read(size)
        meta = json.loads(read["json"])
        assert meta["key"] == sample.key and meta["status"] == "success"
        caption, pixels = rows[meta["url"]]
        assert read["txt"].decode("utf-8") == caption == meta["caption"]
        image = decode_rgb(read["jpg"])
        assert image.size == (32, 32)
        # the 28 px source, upscaled as img2dataset does, matches up to JPEG error: the image
        # belongs to this caption (here < 3 grey levels; two different images differ by > 15)
        expected = np.asarray(Image.fromarray(pixels).resize((32, 32), Image.Resampling.LANCZOS), dtype=float)
        assert np.abs(np.asarray(image.convert("L"), dtype=float) - expected).mean() < 8
        seen.add(meta["url"])
    assert seen == set(rows)
    print(f"{out_of_order} of {len(shards.urls)} img2dataset shards had their keys out of order")
