"""Run safety of the data layer: remote reads end (timeout, retries), a build that writes nothing
fails, and evaluation labels must lie within the classes. Real servers on 127.0.0.1, real shards."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lvmtrain.config.schema import ConfigError, DataConfig
from lvmtrain.data.check import check_shards
from lvmtrain.data.loader import build_train_loader
from lvmtrain.data.order import Cursor
from lvmtrain.data.shards import DataError, RemoteIO, ShardSet
from lvmtrain.data.transforms import ImageNormalizer
from lvmtrain.evaluation import EvalSet, Evaluator, check_labels_cover
from lvmtrain.models.registry import build_model
from tests.conftest import run_lvmtrain
from tests.unit.test_data import _RangeHandler

pytest.importorskip("aiohttp", reason="fsspec's http:// needs aiohttp (a test dependency)")


def dims():
    return SimpleNamespace(rank=0, world=1, device=torch.device("cpu"))


def within(seconds: float, fn):
    """fn() on a thread; fails the test, instead of hanging it, when fn has not returned in time."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"], time.monotonic() - start


@pytest.fixture
def silent_server():
    """http://127.0.0.1:PORT of a server that accepts connections and never says a word."""
    server = socket.create_server(("127.0.0.1", 0), backlog=64)
    server.settimeout(0.2)
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def serve(handler) -> http.server.ThreadingHTTPServer:
    """A threading HTTP server of `handler` on the file system from `/`, started."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory="/"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# --- 1. remote reads end ------------------------------------------------------------------------------

def test_data_check_names_a_silent_server_and_exits_1(silent_server):
    spec = f"{silent_server}/x-{{0..1}}.tar"
    start = time.monotonic()
    proc = run_lvmtrain(["data", "check", spec, "--io-timeout-s", "1", "--io-retries", "1"], check=False, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr
    assert elapsed < 30
    assert "2 unreachable" in proc.stdout
    for url in (f"{silent_server}/x-0.tar", f"{silent_server}/x-1.tar"):
        [line] = [p for p in proc.stdout.splitlines() if p.startswith(f"problem: {url}:")]
        assert "no answer within 1 s" in line and "2 attempt(s)" in line and "data.io_timeout_s" in line
    assert "retrying in 0.5 s" in proc.stderr  # the wait is announced, not silent


def test_train_start_up_names_a_silent_server(silent_server, tmp_path):
    spec = f"{silent_server}/x-{{0..1}}.tar"
    start = time.monotonic()
    proc = run_lvmtrain(["train", "configs/debug/clip.yaml", f"data.train={spec}", "data.val=", "data.io_timeout_s=1",
                         "data.io_retries=1", f"log.dir={tmp_path}", "train.steps=2"], check=False, timeout=90)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert time.monotonic() - start < 60
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lvmtrain: error: no usable samples in 2 shard(s)")
    assert f"{silent_server}/x-0.tar: unreachable" in last and "no answer within 1 s" in last


def test_a_dead_host_is_given_up_after_three_shards(silent_server):
    """Each shard of a silent host costs every attempt until three in a row have failed; the rest
    are not tried (a check of 10,000 shards on a dead server must not take 10,000 timeouts)."""
    report, elapsed = within(60, lambda: check_shards(f"{silent_server}/x-{{0..5}}.tar", io=RemoteIO(0.5, 1)))
    assert [s.status for s in report.shards] == ["unreachable"] * 6
    assert all("failed 2 attempt(s) (no answer within 0.5 s" in s.error for s in report.shards[:3])
    assert all(s.error.startswith("unreachable: ") and "not tried: the last 3 reads from 127.0.0.1:" in s.error
               for s in report.shards[3:])
    assert elapsed < 3 * (2 * 0.5 + 0.5) + 5
    assert len(report.problems) == 6


def test_retries_ride_out_a_flaky_server(shards):
    """A server that answers 503 to the first open (HEAD, then GET) and the first range read of
    each file (here each shard's index sidecar: the shard itself is not read to count or index it)
    serves the same samples as the local files."""

    class Flaky(_RangeHandler):
        seen: dict[str, int] = {}
        refused = 0

        def send_head(self):
            if self.path.endswith((".tar", ".idx.json")):
                n = self.seen[self.path] = self.seen.get(self.path, 0) + 1
                if n in (1, 2, 4):
                    type(self).refused += 1
                    self.send_error(503, "busy, try again")
                    return None
            return super().send_head()

    server = serve(Flaky)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        remote, _ = within(60, lambda: ShardSet.from_spec(url + shards["train"], io=RemoteIO(5, 3)))
        remote_tables, _ = within(60, remote.tables)  # what a loader worker reads, after the count
    finally:
        server.shutdown()
        server.server_close()
    local = ShardSet.from_spec(shards["train"])
    assert not remote.problems
    assert [[(s.key, s.files) for s in shard] for shard in remote_tables] == \
        [[(s.key, s.files) for s in shard] for shard in local.tables()]
    assert Flaky.refused == 6 and not any(path.endswith(".tar") for path in Flaky.seen)  # 3 per shard, ridden out


def test_a_server_lost_after_start_up_stops_the_batch_naming_it(shards):
    """Shards listed, then the server goes: samples count as unreadable_sample, and a batch with no
    readable sample stops with the URL, after a bounded number of attempts."""
    server = serve(_RangeHandler)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    remote = ShardSet.from_spec(url + shards["train"], io=RemoteIO(5, 1))
    server.shutdown()
    server.server_close()
    cfg = DataConfig(train="x", batch_size=16, workers=0, io_timeout_s=1, io_retries=1)
    loader = build_train_loader(remote, cfg, dims(), image_size=28, fields=("label",), accum=1, seed=1, start=Cursor())
    with pytest.raises(DataError, match=r"every sample of a batch is unusable \(first: shard http://127\.0\.0\.1:"
                                        r"\d+/.*train-0000[01]\.tar, sample '[^']+': unreachable: "
                                        r"(its index sidecar \.idx\.json: )?open failed 2 "
                                        r"attempt\(s\) \(ClientConnectorError"):
        within(60, lambda: next(iter(loader)))


# --- 2. a build that writes nothing fails -------------------------------------------------------------

def test_build_of_only_corrupt_images_exits_2_and_writes_nothing(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    for cls in ("cat", "dog"):
        (src / cls).mkdir(parents=True)
        (src / cls / "1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        (src / cls / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    proc = run_lvmtrain(["data", "build", str(src), str(out)], check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "spec:" not in proc.stdout
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"lvmtrain: error: {src}: none of the 4 images could be read (4 skipped, first: "
                            f"{src}/cat/1.jpg: ")
    assert "nothing was written" in error
    assert not out.exists()


# --- 3. labels within the classes ---------------------------------------------------------------------

def test_class_names_must_cover_the_val_labels(shards):
    with pytest.raises(ConfigError) as e:
        check_labels_cover(shards["val"], 5, "eval.class_names")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("eval.class_names: 5 classes, but data.val has labels 0..9 (")
    assert "are outside 0..4" in message and "e.g. label 9 of sample" in message
    assert check_labels_cover(ShardSet.from_spec(shards["val"]), 10, "model.num_classes") == \
        "labels: 512 read, 0..9, within the 10 classes of model.num_classes"


def test_class_names_check_reads_remote_labels_too(shards):
    server = serve(_RangeHandler)
    try:
        spec = f"http://127.0.0.1:{server.server_address[1]}{shards['val']}"
        with pytest.raises(ConfigError, match=r"model\.num_classes: 5 classes, but data\.val has labels 0\.\.9 "):
            within(60, lambda: check_labels_cover(spec, 5, "model.num_classes", io=RemoteIO(5, 1)))
        summary, _ = within(60, lambda: check_labels_cover(spec, 10, "model.num_classes"))
    finally:
        server.shutdown()
        server.server_close()
    assert summary.startswith("labels: 32 read, ")  # the first 32 samples of the one remote shard


def test_train_refuses_class_names_that_miss_labels_before_step_1(shards, tmp_path):
    proc = run_lvmtrain(["train", "configs/debug/clip.yaml", f"data.train={shards['train']}",
                         f"data.val={shards['val']}", "eval.class_names=[a, b, c, d, e]", f"log.dir={tmp_path}",
                         "train.steps=1", "data.workers=0"], check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lvmtrain: error: eval.class_names: 5 classes, but data.val has labels 0..9 ("), last
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("family", ["vit", "clip"])
def test_evaluation_refuses_labels_past_the_classes(shards, family):
    from lvmtrain.data.tokenizer import CLIPTokenizer

    val = ShardSet.from_spec(shards["val"])
    torch.manual_seed(0)
    if family == "vit":
        model, key = build_model("vit_debug", image_size=28, patch_size=7, num_classes=5), "model.num_classes"
        s = EvalSet(name="val", kind="classify", data=val)
    else:
        model, key = build_model("clip_debug", image_size=28, patch_size=7, context_length=16), "eval.class_names"
        s = EvalSet(name="val", kind="zeroshot", data=val, class_names=list("abcde"), templates=["a {}"])
    evaluator = Evaluator([s], DataConfig(train="x", workers=0), dims(), image_size=28, batch_size=256,
                          tokenizer=CLIPTokenizer(context_length=16))
    with pytest.raises(DataError, match=rf"evaluation: \d+ of 512 samples of data.val have a label outside 0\.\.4 "
                                        rf"\(largest label 9; e\.g\. label \d of sample '\w+' in .*val-00000\.tar\), "
                                        rf"but there are 5 classes \({key}\)"):
        evaluator(model, normalize=ImageNormalizer([0.5] * 3, [0.5] * 3))