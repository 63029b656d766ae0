"""Shard index, epoch order and per-rank batches: the invariants resume and DDP rely on."""

import functools
import http.server
import io
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lvmtrain.config.schema import DataConfig
from lvmtrain.data.loader import build_eval_loader, build_train_loader
from lvmtrain.data.order import Cursor
from lvmtrain.data.shards import DataError, ShardSet, index_shard
from lvmtrain.data.tokenizer import CLIPTokenizer
from lvmtrain.data.transforms import (ImageNormalizer, ImageTransform, augment_uniforms, decode_rgb,
                                      decode_rgb_array)


def dims(rank, world):
    return SimpleNamespace(rank=rank, world=world, device=torch.device("cpu"))


def keys_by_step(shards, world, *, workers=0, accum=1, batch=8, start=Cursor(), steps=6, tokenizer=None):
    """{step: sorted keys of the global batch}, gathered over all ranks of a `world`-rank run."""
    cfg = DataConfig(train="x", batch_size=batch, workers=workers)
    out = {}
    for rank in range(world):
        loader = build_train_loader(shards, cfg, dims(rank, world), image_size=28, tokenizer=tokenizer,
                                    fields=("text",) if tokenizer else ("label",),
                                    accum=accum, seed=3, start=start)
        it = iter(loader)
        for step in range(steps):
            for _ in range(accum):
                out.setdefault(step, []).extend(next(it).keys)
    return {s: sorted(k) for s, k in out.items()}


@pytest.fixture(scope="module")
def train_set(shards):
    return ShardSet.from_spec(shards["train"])


def test_index_matches_tarfile(shards, train_set):
    path = shards["dir"] / "train" / "train-00001.tar"
    with tarfile.open(path) as tar:
        members = {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
    samples = index_shard(str(path))
    assert len(samples) == 768 and len(train_set) == 1536
    assert {f"{s.key}.{e}": v for s in samples for e, v in s.files.items()} == members


# NOTE: the epoch order itself (seeded permutation, weighted sources) is tested in test_order.py.


def test_spec_sources_map_to_index_ranges(shards):
    a, b = shards["train"].replace("{00000..00001}", "00000"), shards["train"].replace("{00000..00001}", "00001")
    two = ShardSet.from_spec(f"{a}::{b}")
    assert two.source_ranges() == [(0, 768), (768, 1536)]
    assert ShardSet.from_spec(shards["train"]).source_ranges() == [(0, 1536)]


def test_global_batches_do_not_depend_on_world_size_or_workers(train_set):
    one = keys_by_step(train_set, 1, batch=24)
    assert one == keys_by_step(train_set, 2, batch=12) == keys_by_step(train_set, 3, batch=8, workers=2)
    # Accumulation: 2 micro-steps of 12 on 1 rank = 1 step of 24.
    assert one == keys_by_step(train_set, 1, batch=12, accum=2)
    every = [k for step in one.values() for k in step]
    assert len(every) == len(set(every)) == 6 * 24


def test_resume_from_cursor_continues_with_the_next_samples(train_set):
    straight = keys_by_step(train_set, 2, batch=8, steps=8)
    resumed = keys_by_step(train_set, 1, batch=16, steps=4, start=Cursor(0, 4 * 16))
    assert [resumed[s] for s in range(4)] == [straight[s] for s in range(4, 8)]


def test_epoch_boundary_drops_the_partial_global_batch(train_set):
    per_epoch = len(train_set) // 100  # 15 full global batches of 100, 36 samples dropped
    steps = keys_by_step(train_set, 2, batch=50, steps=per_epoch + 1)
    first_epoch = [k for s in range(per_epoch) for k in steps[s]]
    assert len(set(first_epoch)) == per_epoch * 100
    assert set(steps[per_epoch]) & set(first_epoch)  # next epoch re-uses samples: it started over


def test_clip_batches_carry_tokens_and_eval_sees_every_sample_once(shards, train_set):
    tok = CLIPTokenizer(context_length=16)
    loader = build_train_loader(train_set, DataConfig(train="x", batch_size=4, workers=0), dims(0, 1),
                                image_size=28, fields=("text",), tokenizer=tok, accum=1, seed=0, start=Cursor())
    batch = next(iter(loader))
    assert batch.image.shape == (4, 28, 28, 3) and batch.image.dtype == torch.uint8 and batch.text.shape == (4, 16)
    assert batch.cursor == (0, 4)
    val = ShardSet.from_spec(shards["val"])
    seen, batches, positions = [], [], []
    for rank in range(3):
        got = list(build_eval_loader(val, DataConfig(train="x", workers=0), dims(rank, 3), image_size=28,
                                     batch_size=100))
        batches.append(len(got))
        for b in got:
            seen += b.keys
            positions.append(b.index.tolist())
            assert b.image is not None and b.label is not None and b.text is None
    assert len(seen) == len(set(seen)) == 512
    assert batches == [2, 2, 2]  # 6 batches of 100 positions, one empty: every rank runs as many forwards
    # a batch holds the same positions on any world size (so the same features, to the bit)
    assert sorted(p for p in positions if p) == [list(range(lo, min(lo + 100, 512))) for lo in range(0, 512, 100)]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "I;16"])
def test_decode_rgb_any_mode(mode):
    img = Image.new("RGBA" if mode in ("RGBA", "LA") else "RGB", (5, 4), (10, 200, 30, 0))
    img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    out = decode_rgb(buf.getvalue())
    assert out.mode == "RGB" and out.size == (5, 4)
    if mode in ("RGBA", "LA"):  # fully transparent pixels become white, not black
        assert out.getpixel((0, 0)) == (255, 255, 255)
    assert np.array_equal(decode_rgb_array(buf.getvalue()), np.asarray(out))


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_fast_path_matches_pil(mode):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    fast, ref = decode_rgb_array(buf.getvalue()), np.asarray(decode_rgb(buf.getvalue()))
    assert fast.shape == ref.shape == (48, 64, 3) and fast.dtype == np.uint8
    # libjpeg-turbo through simplejpeg and through PIL may round the colour conversion differently.
    assert np.abs(fast.astype(int) - ref.astype(int)).max() <= 2


def test_missing_and_corrupt_shards_are_named(tmp_path):
    with pytest.raises(DataError, match="nope.tar.*not found"):
        ShardSet.from_spec(str(tmp_path / "nope.tar"))
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(DataError, match="bad.tar"):
        ShardSet.from_spec(str(bad))


def test_transform_and_normalizer_shapes_and_determinism():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)
    train = ImageTransform(24, train=True, scale_min=0.5)
    u = augment_uniforms(1, 2, [3, 4, 5], ImageTransform.DRAWS)
    # a sample's draws depend on (seed, epoch, index) only, not on its batch-mates
    assert np.array_equal(u[1], augment_uniforms(1, 2, [4], ImageTransform.DRAWS)[0])
    assert u.min() >= 0 and u.max() < 1 and len(np.unique(u)) == u.size
    assert not np.array_equal(u[0], augment_uniforms(1, 3, [3], ImageTransform.DRAWS)[0])  # new epoch, new crop
    a, b = train(array, u[0]), train(array, u[0])
    assert a.shape == (24, 24, 3) and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, train(array, u[1]))
    out = np.zeros((24, 24, 3), np.uint8)
    assert train(array, u[0], out) is None and np.array_equal(out, a.numpy())
    centre = ImageTransform(30, train=False)(array)  # centre crop 30x30, no resize needed
    assert torch.equal(centre, torch.from_numpy(array[5:35]))
    x = ImageNormalizer([0.5, 0.25, 0.0], [0.5, 0.25, 1.0])(centre[None])
    assert x.shape == (1, 3, 30, 30)
    expected = (centre.permute(2, 0, 1).float() / 255 - torch.tensor([0.5, 0.25, 0.0])[:, None, None]) \
        / torch.tensor([0.5, 0.25, 1.0])[:, None, None]
    assert torch.allclose(x[0], expected, atol=1e-5)


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that answers `Range: bytes=a-b` as object stores and CDNs do."""

    ranges_served = 0

    def send_head(self):
        spec = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not spec or not path.is_file():
            return super().send_head()
        data = path.read_bytes()
        lo, _, hi = spec.removeprefix("bytes=").partition("-")
        lo, hi = int(lo), min(int(hi) if hi else len(data) - 1, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {lo}-{hi}/{len(data)}")
        self.send_header("Content-Length", str(hi - lo + 1))
        self.end_headers()
        type(self).ranges_served += 1
        return io.BytesIO(data[lo:hi + 1])

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_root(shards):
    """http://127.0.0.1:PORT serving the file system from `/`, with range requests."""
    handler = functools.partial(_RangeHandler, directory="/")
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield f"http://127.0.0.1:{server.server_address[1]}"
        server.shutdown()


@pytest.mark.parametrize("scheme", ["file://", "http", "pipe:cat "])
def test_url_shards_read_like_local_ones(shards, scheme, request):
    """fsspec URLs (file://, and http:// with range reads, the code path of s3:// and gs://) seek;
    pipe: streams."""
    if scheme == "http":
        pytest.importorskip("aiohttp", reason="fsspec's http:// needs aiohttp (a test dependency)")
        scheme = request.getfixturevalue("http_root")
    local = ShardSet.from_spec(shards["train"])
    remote = ShardSet.from_spec(scheme + shards["train"])
    assert [[(s.key, s.files) for s in shard] for shard in remote.tables()] == \
        [[(s.key, s.files) for s in shard] for shard in local.tables()]
    assert keys_by_step(remote, 1, batch=16, steps=4) == keys_by_step(local, 1, batch=16, steps=4)
    a = build_train_loader(local, DataConfig(train="x", batch_size=16, workers=0), dims(0, 1), image_size=28,
                           fields=("label",), accum=1, seed=1, start=Cursor())
    b = build_train_loader(remote, DataConfig(train="x", batch_size=16, workers=0), dims(0, 1), image_size=28,
                           fields=("label",), accum=1, seed=1, start=Cursor())
    for x, y in zip(a, b):
        assert torch.equal(x.image, y.image) and torch.equal(x.label, y.label)
        break
    if scheme.startswith("http"):
        assert _RangeHandler.ranges_served > 0  # read by range requests, not whole-file downloads


def test_truncated_stream_is_reported(tmp_path, shards):
    data = (shards["dir"] / "train" / "train-00000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    local, remote = ShardSet.from_spec(str(cut)), ShardSet.from_spec(f"pipe:cat {cut}")
    assert len(local) == len(remote) and 300 < len(local) < 400
    assert local.problems[0][1] == remote.problems[0][1] == "truncated_shard"


def test_fresh_index_sidecar_spares_the_scan_and_a_stale_one_is_ignored(tmp_path, shards):
    import os

    from lvmtrain.data.tarindex import index_path, write_index

    shard = tmp_path / "s.tar"
    shard.write_bytes((shards["dir"] / "train" / "train-00000.tar").read_bytes())
    samples = index_shard(str(shard))
    write_index(index_path(shard), samples[:10])  # a sidecar that lists only 10 samples
    assert len(ShardSet.from_spec(str(shard))) == 10  # read from the sidecar, not the tar
    assert len(ShardSet.from_spec(f"file://{shard}")) == 10
    os.utime(index_path(shard), (1, 1))  # older than the shard: stale
    assert len(ShardSet.from_spec(str(shard))) == 768


def test_shared_buffers_are_reused_only_after_release(train_set):
    """Released buffers are refilled; held ones never change under the consumer's feet."""

    def run(release_every):
        cfg = DataConfig(train="x", batch_size=16, workers=2)
        loader = build_train_loader(train_set, cfg, dims(0, 1), image_size=28, fields=("label",), accum=1,
                                    seed=5, start=Cursor())
        held, sums = [], []
        for i, batch in zip(range(40), loader):
            sums.append(int(batch.image.sum()))
            if release_every and i % release_every:
                batch.release()
            else:
                held.append((batch.image, sums[-1]))
        # A held buffer still holds what it was handed with, after 40 more batches were made.
        assert all(int(images.sum()) == s for images, s in held)
        return sums

    assert run(release_every=3) == run(release_every=0)
