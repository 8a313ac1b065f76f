"""Every start-up fault of issue 11 is a message that says what to change, never a traceback; data
faults are counted with their shard named."""
import re
import subprocess
from pathlib import Path

import pytest
from data_testutil import good_shards, write_tar
from test_data_stream import small_map

import beit.pretrain as pretrain
from beit.data.loading.data_stats import DataQualityError
from beit.data.loading.stream import build_stream_loader
from beit.data.storage.shardspec import expand_shards
from beit.runtime.run_lock import OutputDirError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value, msg", [
    ("inf", "--lr inf: numeric options must be finite numbers"),
    ("nan", "--lr nan: numeric options must be finite numbers"),
    ("1e39", "--lr 1e+39: numeric options must be finite numbers within float32's range"),
    ("3e38", "--lr 3e+38 is outside (0, 1]: AdamW with such an lr diverges"),
])
def test_non_finite_or_overflowing_options_are_refused_at_start_up(value, msg, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--train_shards", "x.tar", "--lr", value, "--output_dir", str(tmp_path / "o")])
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _cfg(tmp_path, shards, **kw):
    from test_pretrain import tiny_cfg
    return pretrain.PretrainConfig(**tiny_cfg({"train": shards, "val": "", "tok": None}, tmp_path / "out",
                                              **dict(dict(val_shards=[], tokenizer="kmeans"), **kw)))


def test_output_dir_that_is_a_file_or_read_only(tmp_path):
    shards = good_shards(tmp_path / "s", 2, 4)
    (tmp_path / "file").write_text("x")
    cfg = _cfg(tmp_path, shards[0], output_dir=str(tmp_path / "file"))
    with pytest.raises(ValueError, match=r"output_dir .*file is a file, not a folder"):
        pretrain.main([], cfg=cfg)


@pytest.fixture
def read_only_mount(tmp_path):
    """A real read-only filesystem (a tmpfs remounted ro; the tests run as root, who ignores chmod)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    (mnt / "existing").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_read_only_output_dir_is_a_message(tmp_path, read_only_mount):
    from beit.runtime.run_lock import hold_output_dir
    with pytest.raises(OutputDirError, match=r"output_dir .*existing is read-only \(Read-only file system\)"):
        with hold_output_dir(read_only_mount / "existing"):
            pass
    with pytest.raises(OutputDirError, match=r"cannot create output_dir .*new/run: Read-only file system"):
        with hold_output_dir(read_only_mount / "new" / "run"):
            pass


def test_more_workers_than_shards_are_clamped_and_the_log_says_so(tmp_path):
    shards = good_shards(tmp_path, 2, 4)
    loader = build_stream_loader(shards, map_fn=small_map, batch_size=2, num_workers=5)
    assert loader.num_workers == 2
    assert any("workers clamped from 5 to 2" in n for n in loader.notes), loader.notes
    assert sorted(k for b in loader for k in b["__key__"]) == [f"s{i:05d}" for i in range(8)]  # every image once


def test_data_hints_name_real_flags(tmp_path):
    with pytest.raises(ValueError, match=r"Pass --allow_remote_shards true \(config: allow_remote_shards: true"):
        expand_shards("pipe:cat x.tar")
    shards = good_shards(tmp_path / "b", 2, 4)
    assert expand_shards(str(tmp_path / "b") + "/{" + ",".join(Path(s).name for s in shards) + "}") == shards
    from beit.config import parse_config
    from beit.options.pretrain import PretrainConfig
    spec = str(tmp_path / "b" / "shard-{000000,000001}.tar")
    assert parse_config(PretrainConfig, ["--train_shards", spec]).train_shards == [spec]  # a brace list stays whole
    (tmp_path / "e").mkdir()
    write_tar(tmp_path / "e" / "empty-000000.tar", [])
    with pytest.raises(ValueError,
                       match=r"the 1 shard\(s\) hold no samples \(empty or unreadable tars, e\.g\. .*empty-000000"
                                         r"\.tar.*beit shards verify --dir"):
        build_stream_loader(str(tmp_path / "e"), map_fn=small_map, batch_size=2, num_workers=0)
    (tmp_path / "r").mkdir()
    write_tar(tmp_path / "r" / "rotten.tar", [(f"b{i}", {"jpg": b"garbage"}) for i in range(8)])
    with pytest.raises(DataQualityError, match=r"Check the shards with `beit shards verify --dir <shard folder>`"):
        list(build_stream_loader(str(tmp_path / "r"), map_fn=small_map, batch_size=2, num_workers=0))


@pytest.mark.parametrize("manifest", [True, False])
def test_samples_lost_to_a_truncated_tar_are_counted_and_the_shard_named(tmp_path, manifest):
    shards = good_shards(tmp_path, n_shards=2, per_shard=8)
    index = 8
    if not manifest:
        (tmp_path / "manifest.json").unlink()
    data = open(shards[1], "rb").read()
    open(shards[1], "wb").write(data[: len(data) // 2 + 100])       # cut in the middle of a member
    if not manifest:
        from beit.data.storage.shardspec import count_tar_samples
        index = count_tar_samples(shards[1])                       # what the tar index still shows
    loader = build_stream_loader(shards, map_fn=small_map, batch_size=2, num_workers=0, max_bad_fraction=1.0)
    with pytest.warns(UserWarning, match=rf"shard {shards[1]}: tar_error: \d+ sample\(s\) lost: read \d+ of "
                                         rf"{index}") as w:
        for _ in loader:
            pass
    msg = next(str(x.message) for x in w if "tar_error" in str(x.message))
    lost, read = map(int, re.search(r"(\d+) sample\(s\) lost: read (\d+) of", msg).groups())
    assert lost == max(index - read, 1) and lost >= 1
    assert loader.stats["shards"][shards[1]]["reasons"] == {"tar_error": lost}  # counted once, by its shard
    if manifest:
        assert read + lost == 8                                    # every sample of the shard accounted for
