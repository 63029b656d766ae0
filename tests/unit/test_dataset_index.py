"""The dataset index and O(shards) start-up: counts read once from one file, member offsets only
where a shard is read (bounded), stale counts skipped and counted, blocks read by range."""

import json
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lvmtrain.config.schema import DataConfig
from lvmtrain.data import shards as shards_module
from lvmtrain.data.dataset_index import read_dataset_index, write_dataset_index
from lvmtrain.data.loader import _decoder
from lvmtrain.data.shards import DataError, ShardReader, ShardSet
from lvmtrain.data.tarindex import index_path
from tests.conftest import REPO
from tests.unit.test_data import keys_by_step
from tests.unit.test_run_safety_data import _RangeHandler, serve


@pytest.fixture()
def copied(tmp_path, shards):
    """The two train shards in a folder of their own, without their sidecars."""
    folder = tmp_path / "data"
    shutil.copytree(shards["dir"] / "train", folder)
    for sidecar in folder.glob("*.idx.json"):
        sidecar.unlink()
    return folder


def test_index_cli_writes_counts_and_sidecars_and_trains_like_the_spec(copied):
    spec = f"{copied}/train-{{00000..00001}}.tar"
    proc = subprocess.run([sys.executable, "-m", "lvmtrain", "data", "index", spec, "--workers", "2"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    index = copied / "lvmtrain-index.json"
    assert f"data.train={index}" in proc.stdout
    doc = json.loads(index.read_text())
    assert doc["shards"] == [["train-00000.tar", 768], ["train-00001.tar", 768]] and doc["samples"] == 1536
    assert doc["base"] == doc["sidecars"] == ""  # beside the index: the folder moves with its index
    assert all(index_path(copied / f"train-0000{i}.tar").is_file() for i in range(2))
    by_index, by_spec = ShardSet.from_spec(str(index)), ShardSet.from_spec(spec)
    assert list(by_index.urls) == list(by_spec.urls) and np.array_equal(by_index.offsets, by_spec.offsets)
    assert keys_by_step(by_index, 2, batch=16, steps=3) == keys_by_step(by_spec, 2, batch=16, steps=3)
    # Moved elsewhere, the folder still trains from its index.
    moved = copied.parent / "moved"
    copied.rename(moved)
    assert len(ShardSet.from_spec(str(moved / "lvmtrain-index.json")).tables()[1]) == 768


def test_start_up_reads_the_index_alone(copied):
    """41,408 shard entries (LAION-400M's count) of which none exists: the ShardSet is built from
    the index file alone, holds < 64 bytes a shard, pickles (the broadcast) small, and a shard is
    only opened when a sample of it is asked for."""
    index = copied / "big.json"
    names = [f"{i:05d}.tar" for i in range(41_408)]
    index.write_text(json.dumps({"format": "lvmtrain-dataset-index", "version": 1, "base": "laion/",
                                 "sidecars": "laion/", "shards": [[n, 9_600 + i % 700] for i, n in enumerate(names)],
                                 "problems": [["00007.tar", "unreadable_shard", "laion/00007.tar: gone"]]}))
    shard_set = ShardSet.from_spec(str(index))
    assert len(shard_set) == sum(9_600 + i % 700 for i in range(41_408))
    assert shard_set.urls[41_407] == f"{copied}/laion/41407.tar"
    per_shard = shard_set.state_bytes() / 41_408
    assert per_shard < 64, per_shard
    assert len(pickle.dumps(shard_set)) < 64 * 41_408
    assert shard_set.problems == [(f"{copied}/laion/00007.tar", "unreadable_shard", "laion/00007.tar: gone")]
    url, sample, problem = shard_set.sample(123_456_789)
    assert url == f"{copied}/laion/{shard_set.locate(123_456_789)[0]:05d}.tar" and sample is None
    assert problem[0] == "unreadable_shard" and "shard not found" in problem[1]


def test_a_bad_index_is_refused_naming_the_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"shards": []}))
    with pytest.raises(DataError, match=r"x\.json: not an lvmtrain dataset index"):
        ShardSet.from_spec(str(bad))
    bad.write_text(json.dumps({"format": "lvmtrain-dataset-index", "version": 9, "base": "", "sidecars": "",
                               "shards": [["a.tar", 1]]}))
    with pytest.raises(DataError, match=r"x\.json: dataset index version 9, .* rebuild it with `lvmtrain data index`"):
        ShardSet.from_spec(str(bad))
    with pytest.raises(DataError, match=r"nope\.json: dataset index not found"):
        ShardSet.from_spec(str(tmp_path / "nope.json"))


def test_remote_shards_get_their_sidecars_in_a_local_folder(copied, tmp_path):
    """Read-only remote shards: `data index --out` puts the sidecars beside the index; a worker
    then reads a shard's offsets from there, never scanning the remote tar again."""

    class Counting(_RangeHandler):
        tar_requests = 0

        def send_head(self):
            type(self).tar_requests += self.path.endswith(".tar")
            return super().send_head()

    server = serve(Counting)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}{copied}/train-{{00000..00001}}.tar"
        path, counted = write_dataset_index(url, str(tmp_path / "idx" / "remote.json"), workers=1)
        assert counted.counts == [768, 768] and (tmp_path / "idx" / "sidecars" / "train-00000.tar.idx.json").is_file()
        remote = ShardSet.from_spec(str(path))
        assert remote.sidecar_url(1) == f"{tmp_path}/idx/sidecars/train-00001.tar.idx.json"
        Counting.tar_requests = 0
        local = ShardSet.from_spec(f"{copied}/train-{{00000..00001}}.tar")
        assert [[(s.key, s.files) for s in t] for t in remote.tables()] == \
            [[(s.key, s.files) for s in t] for t in local.tables()]
        assert Counting.tar_requests == 0
    finally:
        server.shutdown()
        server.server_close()
    assert read_dataset_index(str(path)).sidecars == (url.rpartition("/")[0] + "/", f"{tmp_path}/idx/sidecars/")


def test_counts_come_from_img2dataset_stats_and_a_stale_count_is_skipped_and_counted(copied, capsys):
    """No sidecar: img2dataset's `{stem}_stats.json` gives the count without a scan. When it
    promises more than the shard holds, the samples past the end are `missing_sample`s: skipped,
    counted, and batches stay full."""
    (copied / "train-00000_stats.json").write_text(json.dumps({"successes": 800}))
    (copied / "train-00001_stats.json").write_text(json.dumps({"successes": 700}))
    shard_set = ShardSet.from_spec(f"{copied}/train-{{00000..00001}}.tar")
    assert [shard_set.count(0), shard_set.count(1)] == [800, 700]  # the stats' word, not a scan's
    decoder = _decoder(shard_set, DataConfig(train="x"), 28, train=False, fields=("label",))
    batch = decoder.batch(list(range(760, 790)))  # 8 real samples of shard 0, then 22 past its end
    assert batch.image.shape[0] == 30 and len(batch.keys) == 8
    assert [s["kind"] for s in batch.skipped] == ["missing_sample"] * 22
    assert "holds 768 samples; its count says 800" in capsys.readouterr().err


def test_shard_tables_are_loaded_on_use_and_bounded(copied, monkeypatch):
    """A process keeps at most TABLES_KEPT shard tables (here 3 of 12 shards listed)."""
    monkeypatch.setattr(shards_module, "TABLES_KEPT", 3)
    index = copied / "repeat.json"
    index.write_text(json.dumps({"format": "lvmtrain-dataset-index", "version": 1, "base": "", "sidecars": "",
                                 "shards": [[f"train-0000{i % 2}.tar", 768] for i in range(12)]}))
    shard_set = ShardSet.from_spec(str(index))
    assert not shard_set._tables
    for shard in range(12):
        assert shard_set.sample(shard * 768 + 5)[1].key == f"train{(shard % 2) * 768 + 5:08d}"
        assert len(shard_set._tables) == min(shard + 1, 3)
    assert shard_set.table(0).nbytes() < 160 * 768  # compact: a list of `Sample`s costs ~900 bytes a sample


def test_a_block_of_consecutive_samples_is_one_read(copied):
    """Decoding 64 consecutive samples reads the shard once for the block, not 3 times per sample."""
    shard_set = ShardSet.from_spec(f"{copied}/train-{{00000..00001}}.tar")
    decoder = _decoder(shard_set, DataConfig(train="x"), 28, train=False, fields=("label",))
    decoder.reader = ShardReader()
    reads = []
    original = decoder.reader._read
    decoder.reader._read = lambda url, offset, size: reads.append(size) or original(url, offset, size)
    indices = list(range(100, 164)) + list(range(900, 932))  # a run in each shard
    batch = decoder.batch(np.random.default_rng(0).permutation(indices))
    assert len(batch.keys) == 96 and not batch.skipped
    assert len(reads) == 2
    assert batch.label.tolist() == [int(k) for k in (decoder(i)["label"] for i in
                                                        np.random.default_rng(0).permutation(indices))]
