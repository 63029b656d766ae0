"""DINO multi-crop views: made by the loader's workers, a pure function of (seed, epoch, index)."""

import io
import itertools
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from lvmtrain.config.schema import DataConfig
from lvmtrain.data.batch import Batch
from lvmtrain.data.loader import _decoder, build_train_loader
from lvmtrain.data.multicrop import MultiCropTransform, ViewPlan, apply_plan
from lvmtrain.data.order import Cursor
from lvmtrain.data.shards import ShardSet
from lvmtrain.data.transforms import ImageNormalizer, augment_uniforms
from lvmtrain.data.writer import write_shard
from lvmtrain.trainer import Trainer

VIEWS = (28, 12, 4)  # Fashion-MNIST: global 28, local 12


def dims():
    return SimpleNamespace(rank=0, world=1, device=torch.device("cpu"))


def image(height=40, width=56, seed=0):
    """A smooth colourful image: crops, blur and jitter all change it visibly."""
    small = np.random.default_rng(seed).integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


def loader(train_set, *, batch_size=8, start=Cursor(), workers=0):
    cfg = DataConfig(train="x", batch_size=batch_size, workers=workers)
    return build_train_loader(train_set, cfg, dims(), image_size=28, fields=("label", "views"), accum=1, seed=7,
                              start=start, views=VIEWS)


@pytest.fixture(scope="module")
def train_set(shards):
    return ShardSet.from_spec(shards["train"])


def test_views_shapes_and_writing_into_given_arrays():
    t = MultiCropTransform(32, 16, 3)
    u = augment_uniforms(0, 0, [1], t.DRAWS)[0]
    views = t(image(), u)
    assert [v.shape for v in views] == [(32, 32, 3)] * 2 + [(16, 16, 3)] * 3
    assert all(v.dtype == np.uint8 for v in views)
    out = [np.zeros((s, s, 3), np.uint8) for s in t.sizes]
    assert t(image(), u, out) is out
    assert all(np.array_equal(a, b) for a, b in zip(views, out))


def test_views_are_a_pure_function_of_seed_epoch_and_index():
    t = MultiCropTransform(*VIEWS)
    u = augment_uniforms(3, 1, [10, 11], t.DRAWS)

    def views(row):
        return np.concatenate([v.ravel() for v in t(image(), row)])

    assert np.array_equal(views(u[0]), views(augment_uniforms(3, 1, [10], t.DRAWS)[0]))
    assert not np.array_equal(views(u[0]), views(u[1]))  # another sample
    assert not np.array_equal(views(u[0]), views(augment_uniforms(3, 2, [10], t.DRAWS)[0]))  # another epoch
    first = t(image(), u[0])
    assert not np.array_equal(first[0], first[1])  # the two global crops differ


def test_augmentation_rates_follow_dinov2():
    """Blur 1.0 / 0.1 / 0.5 (first global, second global, locals), solarisation on the second
    global crop only at 0.2, jitter 0.8 in every order, grayscale 0.2."""
    t = MultiCropTransform(*VIEWS)
    plans = [t.plan(row) for row in augment_uniforms(0, 0, np.arange(2000), t.DRAWS)]

    def rate(view, what):
        return np.mean([what(p[view]) for p in plans])

    assert [rate(k, lambda p: p.solarize) for k in (0, 2, 3, 4, 5)] == [0.0] * 5
    assert rate(1, lambda p: p.solarize) == pytest.approx(0.2, abs=0.03)
    assert rate(0, lambda p: p.blur_sigma is not None) == 1.0
    assert rate(1, lambda p: p.blur_sigma is not None) == pytest.approx(0.1, abs=0.02)
    assert rate(3, lambda p: p.blur_sigma is not None) == pytest.approx(0.5, abs=0.04)
    assert rate(2, lambda p: bool(p.jitter)) == pytest.approx(0.8, abs=0.03)
    assert rate(4, lambda p: p.grayscale) == pytest.approx(0.2, abs=0.03)
    # DINOv2's sigmas 0.1..2 at 224 px (global) / 96 px (local), scaled to these crops' sizes
    sigmas = np.array([p[0].blur_sigma for p in plans]) * 224 / VIEWS[0]
    assert 0.1 <= sigmas.min() < 0.2 and 1.9 < sigmas.max() <= 2.0 + 1e-9
    local = np.array([p[3].blur_sigma for p in plans if p[3].blur_sigma is not None]) * 96 / VIEWS[1]
    assert 0.1 <= local.min() < 0.2 and 1.9 < local.max() <= 2.0 + 1e-9
    jitters = [p[k].jitter for p in plans for k in range(6) if p[k].jitter]
    assert {tuple(op for op, _ in j) for j in jitters} == set(itertools.permutations(range(4)))
    for op, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        factors = [f for j in jitters for o, f in j if o == op]
        assert lo <= min(factors) < lo + 0.02 and hi - 0.02 < max(factors) <= hi


def test_photometric_ops_do_what_torchvision_does():
    img = image(64, 64, seed=3)
    x = img.astype(np.float64)
    luma = x @ [0.299, 0.587, 0.114]

    def run(**plan):
        out = img.copy()
        apply_plan(out, ViewPlan(**{"jitter": (), "grayscale": False, "blur_sigma": None, "solarize": False, **plan}))
        return out.astype(np.float64)

    def close(a, b, tol=1.0):
        return np.abs(a - np.clip(b, 0, 255)).max() <= tol

    assert close(run(jitter=((0, 1.3),)), x * 1.3)  # brightness, clamped
    assert close(run(jitter=((1, 0.7),)), 0.7 * x + 0.3 * luma.mean())  # contrast: towards the mean luma
    assert close(run(jitter=((2, 1.2),)), 1.2 * x - 0.2 * luma[..., None])  # saturation: away from the grey
    assert np.array_equal(run(solarize=True), np.where(x >= 128, 255 - x, x))
    gray = run(grayscale=True)
    assert close(gray, np.repeat(luma[..., None], 3, axis=2))
    blurred = run(blur_sigma=1.5)
    assert blurred.std() < x.std() and abs(blurred.mean() - x.mean()) < 1
    # hue: a quarter turn of the colour circle maps pure red to (about) chartreuse green; grey stays grey
    probe = np.array([[[255, 0, 0], [128, 128, 128]]], np.uint8)
    apply_plan(probe, ViewPlan(((3, 0.25),), False, None, False))
    assert close(probe[0, 0].astype(np.float64), np.array([128, 255, 0]), tol=3)
    assert probe[0, 1].tolist() == [128, 128, 128]


def test_loader_batches_carry_views_and_the_image_is_the_first_global_view(train_set):
    batch = next(iter(loader(train_set)))
    assert [tuple(v.shape) for v in batch.views] == [(8, 28, 28, 3)] * 2 + [(8, 12, 12, 3)] * 4
    assert all(v.dtype == torch.uint8 for v in batch.views) and batch.label.shape == (8,)
    assert batch.image is batch.views[0]
    # each sample's views are those of its (seed, epoch, index), whoever decodes it
    decoder = _decoder(train_set, DataConfig(train="x"), 28, train=True, fields=("views",), views=VIEWS)
    for n in (0, 5):
        index = int(batch.index[n])
        views = decoder(index, augment_uniforms(7, 0, [index], decoder.transform.DRAWS)[0])["image"]
        assert all(np.array_equal(v, b[n].numpy()) for v, b in zip(views, batch.views))


def test_views_cross_worker_processes_and_a_resume_repeats_them(train_set):
    straight = list(itertools.islice(loader(train_set, workers=2), 4))
    assert straight[0].image is straight[0].views[0]  # one tensor still, out of the worker process
    resumed = list(itertools.islice(loader(train_set, start=Cursor(0, 2 * 8)), 2))
    for a, b in zip(straight[2:], resumed):
        assert a.keys == b.keys and all(torch.equal(x, y) for x, y in zip(a.views, b.views))


def test_bad_samples_are_filled_in_every_view(tmp_path):
    samples = []
    for n in range(8):
        buf = io.BytesIO()
        Image.fromarray(image(seed=n)).save(buf, format="PNG")
        samples.append((f"s{n:02d}", {"png": buf.getvalue() if n not in (2, 5) else b"not an image", "cls": str(n)}))
    write_shard(tmp_path / "s.tar", samples)
    batch = next(iter(loader(ShardSet.from_spec(str(tmp_path / "s.tar")))))
    assert len(batch.keys) == 6 and [s["kind"] for s in batch.skipped] == ["bad_image"] * 2
    for v in batch.views:  # the two bad slots hold copies of the first two good samples
        assert v.shape[0] == 8 and torch.equal(v[6:], v[:2])


def test_views_move_and_are_normalised_on_the_device():
    views = [torch.randint(0, 256, (2, s, s, 3), dtype=torch.uint8) for s in (28, 28, 12)]
    batch = Batch(image=views[0], keys=["a", "b"], shards=["x", "x"], views=views)
    trainer = SimpleNamespace(dims=dims(), task=SimpleNamespace(fields=("views",)),
                              normalize=ImageNormalizer([0.5] * 3, [0.25] * 3), step=0, _inject_nan_at=0)
    out = Trainer._to_device(trainer, batch)
    assert [tuple(v.shape) for v in out.views] == [(2, 3, 28, 28), (2, 3, 28, 28), (2, 3, 12, 12)]
    assert out.views[0] is out.image and out.image.dtype == torch.float32
    assert torch.allclose(out.views[2], (views[2].permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25, atol=1e-6)
