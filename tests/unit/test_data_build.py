"""`build_shards` / `lvmtrain data build` from a class folder, a CSV, a parquet table and other shards."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from lvmtrain.data.build import build_shards, load_demo_source, write_shards
from lvmtrain.data.check import check_shards
from lvmtrain.data.shards import DataError, Sample, ShardSet, index_shard
from lvmtrain.data.tarindex import index_path, load_index, write_index
from lvmtrain.data.transforms import decode_rgb
from tests.conftest import run_lvmtrain


@pytest.fixture(scope="module")
def images():
    _, classes, (x, y), _ = load_demo_source()
    return x[:600], y[:600], classes


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def read_all(spec: str) -> list[dict]:
    """Every sample of a spec through ShardSet, files read by the offsets of its index."""
    shards = ShardSet.from_spec(spec)
    out = []
    for i in range(len(shards)):
        url, sample, _ = shards.sample(i)
        with open(url, "rb") as f:
            files = {}
            for ext, (offset, size) in sample.files.items():
                f.seek(offset)
                files[ext] = f.read(size)
        out.append({"__key__": sample.key, **files})
    return out


def assert_sidecars_match(out: Path, stats: dict):
    assert stats["shards"], "no shards written"
    for name, count in stats["shards"].items():
        indexed = index_shard(str(out / name))
        sidecar = load_index(index_path(out / name))
        assert [(s.key, s.files) for s in sidecar] == [(s.key, s.files) for s in indexed]
        assert len(indexed) == count


@pytest.fixture
def class_folder(tmp_path, images) -> tuple[Path, list[Path]]:
    """root/{ankle_boot,bag,coat}/ with PNG, JPEG and greyscale files, a broken .jpg and a README."""
    x, _, _ = images
    root = tmp_path / "folder"
    good = []
    for c, cls in enumerate(["coat", "ankle_boot", "bag"]):
        (root / cls / "more").mkdir(parents=True)
        for i in range(7):
            img = Image.fromarray(x[c * 10 + i])
            if i % 2:
                path = root / cls / f"{i}.jpg"
                img.convert("RGB").save(path, quality=90)
            else:
                path = root / cls / ("more" if i == 4 else "") / f"{i}.png"
                img.save(path)
            good.append(path)
    (root / "bag" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "bag" / "README.txt").write_text("not an image")
    return root, good


def test_folder_build(class_folder, tmp_path):
    root, good = class_folder
    out = tmp_path / "out"
    stats = build_shards(root, out, per_shard=8, prefix="train", workers=2)
    assert stats["successes"] == 21 and stats["skipped"] == 1
    assert stats["skipped_files"][0]["file"].endswith("bag/broken.jpg")
    assert sorted(stats["shards"]) == [f"train-{i:05d}.tar" for i in range(3)]
    assert stats["spec"] == f"{out}/train-{{00000..00002}}.tar"
    assert json.loads((out / "_stats.json").read_text()) == stats
    classes = json.loads((out / "classes.json").read_text())
    assert classes == {"folders": ["ankle_boot", "bag", "coat"], "class_names": ["ankle boot", "bag", "coat"]}
    assert_sidecars_match(out, stats)

    samples = read_all(stats["spec"])
    # sorted class folders, then sorted paths inside each (sub-folders included)
    expected = sorted(good, key=lambda p: (p.relative_to(root).parts[0], str(p.relative_to(root))))
    assert [json.loads(s["json"])["url"] for s in samples] == [str(p) for p in expected]
    for s, path in zip(samples, expected):
        cls = path.relative_to(root).parts[0]
        ext = "jpg" if path.suffix == ".jpg" else "png"
        assert s[ext] == path.read_bytes()  # --image-format keep: the file's own bytes
        assert s["txt"].decode() == f"a photo of a {cls.replace('_', ' ')}"
        assert int(s["cls"]) == classes["folders"].index(cls)
    assert check_shards(stats["spec"], decode_per_shard=8).bad == 0

    again = build_shards(root, tmp_path / "again", per_shard=8, prefix="train", workers=1)
    for name in stats["shards"]:  # deterministic: the same bytes whatever the worker count
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert again["shards"] == stats["shards"]


def test_folder_build_resize_to_jpeg(class_folder, tmp_path):
    root, _ = class_folder
    stats = build_shards(root, tmp_path / "out", per_shard=100, image_format="jpg", resize=20,
                         caption_template="{} clothing")
    [sample] = [s for s in read_all(stats["spec"]) if s["__key__"] == "000000007"]
    assert sorted(sample) == ["__key__", "cls", "jpg", "json", "txt"]
    assert Image.open(io.BytesIO(sample["jpg"])).format == "JPEG"
    assert decode_rgb(sample["jpg"]).size == (20, 20)
    assert sample["txt"] == b"bag clothing"
    meta = json.loads(sample["json"])
    assert (meta["width"], meta["original_width"]) == (20, 28)


def write_table_images(tmp_path: Path, images, n: int = 30) -> tuple[list[dict], Path]:
    x, y, classes = images
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(n):
        path = tmp_path / "img" / f"{i}.png"
        Image.fromarray(x[i]).save(path)
        # relative to the table's folder, absolute, and file:// URLs
        value = [f"img/{i}.png", str(path), path.as_uri()][i % 3]
        rows.append({"url": value, "caption": f"«{classes[y[i]]}» número {i}", "label": int(y[i]), "file": path})
    return rows, tmp_path


def check_table_build(rows, out: Path, stats: dict):
    assert stats["successes"] == len(rows) and stats["skipped"] == 0
    assert_sidecars_match(out, stats)
    samples = read_all(stats["spec"])
    assert [s["txt"].decode("utf-8") for s in samples] == [r["caption"] for r in rows]
    assert [int(s["cls"]) for s in samples] == [r["label"] for r in rows]
    assert [s["png"] for s in samples] == [r["file"].read_bytes() for r in rows]


def test_csv_build(tmp_path, images):
    rows, base = write_table_images(tmp_path, images)
    table = base / "list.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["url", "caption", "label"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    stats = build_shards(table, base / "out", per_shard=12, workers=2)
    assert list(stats["shards"]) == ["00000.tar", "00001.tar", "00002.tar"]
    check_table_build(rows, base / "out", stats)


def test_csv_errors_name_the_file_and_row(tmp_path, images):
    rows, base = write_table_images(tmp_path, images, n=6)
    table = base / "bad.csv"
    table.write_text("url,label\nimg/0.png,1\n")
    with pytest.raises(DataError, match=r"bad.csv: no column caption / text \(columns: url, label\)"):
        build_shards(table, base / "out")

    table.write_text("path,caption\nimg/0.png,a\nimg/nope.png,b\n")
    with pytest.raises(DataError, match=r"bad.csv: row 2 \(line 3\): image .*img/nope.png not found"):
        build_shards(table, base / "out")

    (base / "img" / "3.png").write_bytes(b"\x89PNG garbage")
    table.write_text("path,caption\n" + "".join(f"img/{i}.png,c{i}\n" for i in range(6)))
    with pytest.raises(DataError, match=r"bad.csv: row 4 \(line 5\): image .*img/3.png is unreadable"):
        build_shards(table, base / "out", per_shard=2, workers=2)
    assert not list((base / "out").glob("*.tar*"))  # no half-built output left behind

    table.write_text("url,caption\nhttps://example.com/a.jpg,a\n")
    with pytest.raises(DataError, match=r"row 1 .*remote URL.*img2dataset"):
        build_shards(table, base / "out")


def test_parquet_build(tmp_path, images):
    pa = pytest.importorskip("pyarrow", reason="parquet builds need pyarrow (pip install pyarrow)")
    import pyarrow.parquet as pq

    rows, base = write_table_images(tmp_path, images)
    table = pa.table({"filepath": [r["url"] for r in rows], "text": [r["caption"] for r in rows],
                      "label": [r["label"] for r in rows]})
    pq.write_table(table, base / "list.parquet")
    stats = build_shards(base / "list.parquet", base / "out", per_shard=16)
    check_table_build(rows, base / "out", stats)


def test_reshard_keeps_keys_and_bytes(tmp_path, images):
    x, y, classes = images
    src = write_shards(tmp_path / "src", "src", x, y, classes, per_shard=300)
    spec = f"{tmp_path}/src/src-{{00000..00001}}.tar"
    out = tmp_path / "out"
    proc = run_lvmtrain(["data", "build", spec, str(out), "--per-shard", "128", "--workers", "2"], timeout=300)
    assert f"spec: {out}/{{00000..00004}}.tar" in proc.stdout
    stats = json.loads((out / "_stats.json").read_text())
    assert list(stats["shards"].values()) == [128, 128, 128, 128, 88]
    assert_sidecars_match(out, stats)

    before = [m for path in src for m in tar_members(path)]
    after = [m for name in stats["shards"] for m in tar_members(out / name)]
    assert after == before  # same member names (keys + extensions), same bytes, same order

    by_key = {}
    for name, data in before:
        key, ext = name.split(".", 1)
        by_key.setdefault(key, {})[ext] = data
    samples = read_all(stats["spec"])
    assert [s.pop("__key__") for s in samples] == list(by_key)
    assert samples == list(by_key.values())

    streamed = list(wds.WebDataset(stats["spec"], shardshuffle=False))
    assert [s["__key__"] for s in streamed] == list(by_key)
    assert all({k: v for k, v in s.items() if not k.startswith("__")} == by_key[s["__key__"]] for s in streamed)


def test_reshard_refuses_duplicate_keys_and_a_used_output(tmp_path, images):
    x, y, classes = images
    write_shards(tmp_path / "src", "src", x[:20], y[:20], classes, per_shard=20)
    shard = f"{tmp_path}/src/src-00000.tar"
    with pytest.raises(DataError, match="key src00000000 is in both"):
        build_shards(f"{shard}::{shard}", tmp_path / "out")
    build_shards(shard, tmp_path / "out")
    with pytest.raises(DataError, match="already holds shards"):
        build_shards(shard, tmp_path / "out")


def test_index_round_trip_and_version_check(tmp_path):
    samples = [Sample("a", {"png": (512, 100), "txt": (1536, 7)}), Sample("b/c", {"jpg": (2560, 3)})]
    path = tmp_path / "x.tar.idx.json"
    write_index(path, samples)
    assert json.loads(path.read_text()) == {
        "version": 1, "samples": [["a", {"png": [512, 100], "txt": [1536, 7]}], ["b/c", {"jpg": [2560, 3]}]]}
    assert list(load_index(path)) == samples
    path.write_text(json.dumps({"version": 2, "samples": []}))
    with pytest.raises(DataError, match="x.tar.idx.json: not a version 1 shard index"):
        load_index(path)


def test_write_shards_still_builds_numbered_shards(tmp_path, images):
    x, y, classes = images
    paths = write_shards(tmp_path, "t", x[:10], y[:10], classes, per_shard=4)
    assert [p.name for p in paths] == ["t-00000.tar", "t-00001.tar", "t-00002.tar"]
    assert np.array_equal(np.asarray(decode_rgb(read_all(str(paths[0]))[0]["png"]))[..., 0], x[0])


def test_parquet_errors_say_what_to_do(tmp_path):
    table = tmp_path / "list.parquet"
    table.write_bytes(b"PAR1 not parquet")
    try:
        import pyarrow  # noqa: F401
        expected = "list.parquet: not a readable parquet file"
    except ImportError:
        expected = "reading parquet needs pyarrow: pip install pyarrow"
    with pytest.raises(DataError, match=expected):
        build_shards(table, tmp_path / "out")
