"""Shard writer and verify: layouts, determinism, limits, interrupted runs, hash and sample checks."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from data_testutil import encode, jpeg, odd_images, photo

import beit.data.storage.shard_writer as shard_writer
from beit.data.shards import main as shards_main
from beit.data.storage.shard_format import sha256_file
from beit.data.storage.shard_writer import Item, WriteOptions, write_shards


def make_folder(root: Path, n: int = 12) -> Path:
    for i in range(n):
        sub = root / ("a" if i % 2 else "b/deeper")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img.{i}.jpg").write_bytes(jpeg(i, size=(64 + i, 48)))
    (root / "notes.txt").write_text("not an image")
    return root


def hashes(d: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(d.glob("*.tar"))} | {"manifest": sha256_file(d / "manifest.json")}


def test_folder_write_is_deterministic_and_worker_independent(tmp_path):
    src = make_folder(tmp_path / "src")
    outs = []
    for name, workers in (("o1", 1), ("o2", 1), ("o3", 2)):
        assert shards_main(["write", "--source", str(src), "--out", str(tmp_path / name), "--samples_per_shard", "5",
                            "--workers", str(workers), "--progress", "false"]) == 0
        outs.append(hashes(tmp_path / name))
    assert outs[0] == outs[1] == outs[2]
    m = json.loads((tmp_path / "o1" / "manifest.json").read_text())
    assert [s["samples"] for s in m["shards"]] == [5, 5, 2] and m["num_samples"] == 12
    assert all(s["sha256"] == sha256_file(tmp_path / "o1" / s["name"]) for s in m["shards"])
    assert m["options"]["max_samples"] == 5 and m["source"].startswith("folder:") and m["label_map"] is None
    with tarfile.open(tmp_path / "o1" / "train-000000.tar") as t:  # 'train-*' by default: the next command's pattern
        names = t.getnames()
    assert all(n.count(".") == 1 and n.endswith(".jpg") for n in names)  # dots in names never split keys
    assert not list((tmp_path / "o1").glob("*.tmp"))


def test_imagenet_layout_labels_resize_and_reencode(tmp_path):
    src = tmp_path / "inet"
    for c, cls in enumerate(["n01", "n02", "n03"]):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            (src / cls / f"x{i}.png").write_bytes(encode(photo(10 * c + i, (120, 90)), "PNG"))
    out = tmp_path / "out"
    assert shards_main(["write", "--source", str(src), "--out", str(out), "--layout", "imagenet",
                        "--prefix", "train", "--resize", "60", "--reencode", "jpg", "--quality", "80",
                        "--samples_per_shard", "100",
                        "--progress", "false"]) == 0
    assert json.loads((out / "class_index.json").read_text()) == {"n01": 0, "n02": 1, "n03": 2}
    import io

    from PIL import Image

    from beit.data.storage.shard_format import iter_tar_samples
    with open(out / "train-000000.tar", "rb") as f:
        samples = list(iter_tar_samples(f))
    assert len(samples) == 9
    for s in samples:
        assert int(s["cls"]) == int(s["__key__"].split("/")[0][-1]) - 1
        assert Image.open(io.BytesIO(s["jpg"])).size == (60, 45)
    # the val split reuses the training label map; an unknown class is refused
    (src / "n99").mkdir()
    (src / "n99" / "y.png").write_bytes(encode(photo(1), "PNG"))
    rc = shards_main(["write", "--source", str(src), "--out", str(out), "--layout", "imagenet", "--prefix", "val",
                      "--label_map", str(out / "class_index.json"), "--progress", "false"])
    assert rc == 2


def test_ade20k_pairs_and_file_list(tmp_path):
    root = tmp_path / "ade"
    for sub in ("images/training", "annotations/training"):
        (root / sub).mkdir(parents=True)
    for i in range(4):
        (root / "images/training" / f"ADE_{i}.jpg").write_bytes(jpeg(i, (80, 60)))
        if i != 3:
            (root / "annotations/training" / f"ADE_{i}.png").write_bytes(
                encode(photo(i, (80, 60)).convert("L"), "PNG"))
    out = tmp_path / "ade_out"
    assert shards_main(["write", "--source", str(root), "--out", str(out), "--layout", "ade20k",
                        "--split", "training", "--resize", "40", "--progress", "false"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_samples"] == 3 and m["shards"][0]["name"] == "training-000000.tar"
    assert [x["key"] for x in m["writes"]["training"]["skipped"]] == ["ADE_3_jpg"]  # keys keep the extension
    from beit.data.storage.shard_verify import verify_folder
    reports, problems = verify_folder(out)
    assert problems == [] and all(r.ok for r in reports)  # seg resized with the image (40x30)

    lst = tmp_path / "list.txt"
    imgs = sorted((root / "images/training").glob("*.jpg"))
    lst.write_text("# path<TAB>label\n" + "".join(f"{p}\t{'cat' if i % 2 else 'dog'}\n" for i, p in enumerate(imgs)))
    out2 = tmp_path / "list_out"
    assert shards_main(["write", "--source", str(lst), "--out", str(out2), "--layout", "filelist",
                        "--progress", "false"]) == 0
    m2 = json.loads((out2 / "manifest.json").read_text())
    assert m2["label_map"] == {"cat": 0, "dog": 1} and m2["num_samples"] == 4


def test_max_bytes_and_unreadable_inputs(tmp_path):
    items = [Item(f"k{i}", jpeg(i, (100, 80)), ext="jpg") for i in range(10)]
    items.append(Item("broken", b"\xff\xd8\xff garbage", ext="jpg"))
    paths = write_shards(items, tmp_path, opts=WriteOptions(max_bytes=12_000), progress=False)
    assert all(Path(p).stat().st_size <= 12_000 for p in paths) and len(paths) > 1
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["num_samples"] == 10 and m["writes"]["shard"]["skipped"][0]["key"] == "broken"
    with pytest.raises(FileExistsError, match="--resume"):
        write_shards(items, tmp_path, progress=False)


def test_interrupted_write_resumes_to_identical_shards(tmp_path, monkeypatch):
    items = [Item(f"k{i:03d}", jpeg(i), ext="jpg", label=i % 4) for i in range(23)]
    opts = WriteOptions(max_samples=5)
    write_shards(items, tmp_path / "clean", opts=opts, progress=False)

    real, calls = shard_writer.encode_item, {"n": 0}

    def crash_after_12(item, o):
        calls["n"] += 1
        if calls["n"] > 12:
            raise KeyboardInterrupt
        return real(item, o)

    monkeypatch.setattr(shard_writer, "encode_item", crash_after_12)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_shards(items, out, opts=opts, progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert list(out.glob("*.tar.tmp"))  # the half-written shard never got its final name
    assert json.loads((out / "manifest.json").read_text())["writes"]["shard"]["complete"] is False
    monkeypatch.setattr(shard_writer, "encode_item", real)
    write_shards(items, out, opts=opts, progress=False, resume=True)
    assert hashes(out) == hashes(tmp_path / "clean")
    with pytest.raises(ValueError, match="cannot resume"):
        write_shards(items, out, opts=WriteOptions(max_samples=6), progress=False, resume=True)


def test_verify_reports_hash_mismatch_and_bad_samples(tmp_path):
    items = [Item(f"k{i}", jpeg(i), ext="jpg") for i in range(6)]
    full = jpeg(77, (200, 150))
    items.append(Item("trunc", full[: len(full) // 2], ext="jpg"))
    items += [Item(n.split(".")[0], d, ext=n.split(".")[1]) for n, d in odd_images().items()]
    write_shards(items, tmp_path, opts=WriteOptions(max_samples=6, validate="none"), progress=False)
    cmd = [sys.executable, "-m", "beit.data.shards", "verify", "--dir", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1
    assert "BAD SAMPLE" in r.stdout and "trunc: truncated" in r.stdout
    assert r.stdout.count("BAD SAMPLE") == 1  # CMYK, palette, RGBA, 16-bit and grey are fine
    shard = sorted(tmp_path.glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # flip one byte inside an image, same size
    shard.write_bytes(bytes(data))
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1 and f"BAD SHARD {shard.name}: sha256" in r.stdout
    shard.unlink()
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert f"BAD SHARD {shard.name}: missing file" in r.stdout


def test_val_fraction_is_a_seeded_stratified_split_with_chaining_names(tmp_path):
    src = tmp_path / "cls"
    sizes = {"ant": 10, "bee": 6, "cow": 2}
    for c, n in sizes.items():
        (src / c).mkdir(parents=True)
        for i in range(n):
            (src / c / f"{c}{i}.jpg").write_bytes(jpeg(hash(c) % 1000 + i))
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert shards_main(["write", "--source", str(src), "--out", str(out), "--layout", "imagenet",
                            "--val_fraction", "0.25", "--progress", "false"]) == 0
        outs.append(hashes(out))
    assert outs[0] == outs[1]  # seeded: the same split and bytes twice
    out = tmp_path / "a"
    m = json.loads((out / "manifest.json").read_text())
    assert m["label_map"] == {"ant": 0, "bee": 1, "cow": 2}
    by_split: dict = {"train": [], "val": []}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as t:
            for member in t.getmembers():
                if member.name.endswith(".cls"):
                    by_split[shard.name.split("-")[0]].append((member.name, int(t.extractfile(member).read())))
    counts = {c: sum(1 for _, lab in by_split["val"] if lab == i) for i, c in enumerate(sizes)}
    assert counts == {"ant": 2, "bee": 2, "cow": 1}  # per class round(0.25 n), at least one, never all
    train_keys, val_keys = {k for k, _ in by_split["train"]}, {k for k, _ in by_split["val"]}
    assert len(train_keys) + len(val_keys) == 18 and not train_keys & val_keys
    # 13 training images, auto shard size ceil(13 / 16) = 1: enough shards for 16 loader readers
    assert len(list(out.glob("train-*.tar"))) == len(train_keys) == 13


def test_renamed_and_unknown_writer_flags_get_a_hint(tmp_path, capsys):
    src = make_folder(tmp_path / "src", n=3)
    with pytest.raises(SystemExit):
        shards_main(["write", "--source", str(src), "--out", str(tmp_path / "o"), "--max_samples", "5"])
    assert "renamed samples_per_shard" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        shards_main(["write", "--source", str(src), "--out", str(tmp_path / "o"), "--samples_per_shrad", "5"])
    assert "did you mean --samples_per_shard" in capsys.readouterr().err
    # booleans: --flag, --no-flag and --flag value
    assert shards_main(["write", "--source", str(src), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert shards_main(["write", "--source", str(src), "--out", str(tmp_path / "o"), "--overwrite",
                        "--progress", "false"]) == 0
