"""The shard tar reader against tars written by other tools (webdataset's TarWriter, GNU tar in its gnu
and posix formats, Python's tarfile with pax long names), read back by Python's tarfile as the
reference; and its failure modes: truncation anywhere and a damaged header mid-archive both raise."""
import io
import os
import shutil
import subprocess
import tarfile

import pytest

from beit.data.storage.shard_format import iter_tar_samples, split_member_name


def reference_samples(data: bytes) -> list[dict]:
    """Python's tarfile (random access) grouping members by key, as WebDataset does."""
    out: list[dict] = []
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        for m in t.getmembers():
            if m.isfile():
                key, ext = split_member_name(m.name)
                if not out or out[-1]["__key__"] != key:
                    out.append({"__key__": key})
                out[-1][ext] = t.extractfile(m).read()
    return out


def read(data: bytes):
    got, err = [], None
    try:
        for s in iter_tar_samples(io.BytesIO(data)):
            got.append(s)
    except tarfile.ReadError as e:
        err = str(e)
    return got, err


def webdataset_tar(tmp_path) -> bytes:
    import webdataset as wds
    path = tmp_path / "wds.tar"
    with wds.TarWriter(str(path)) as w:
        for i in range(4):
            w.write({"__key__": f"dir/sample{i:04d}", "jpg": os.urandom(1000 + 7 * i), "cls": str(i).encode(),
                     "json": b'{"a": 1}'})
    return path.read_bytes()


def pax_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for i in range(3):
            for ext, data in (("jpg", os.urandom(600 + i)), ("cls", b"2")):
                info = tarfile.TarInfo(f"ünïcode/{'y' * 150}{i}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def gnu_tar(tmp_path, fmt: str) -> bytes:
    if shutil.which("tar") is None:
        pytest.skip("no tar command")
    src = tmp_path / "src" / ("x" * 120)  # a path longer than ustar's 100-byte name field
    src.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (src / f"s{i}.jpg").write_bytes(os.urandom(900 + i))
        (src / f"s{i}.cls").write_bytes(b"1")
    out = tmp_path / f"{fmt}.tar"
    subprocess.run(["tar", f"--format={fmt}", "--sort=name", "-cf", str(out), "-C", str(tmp_path / "src"), "."],
                   check=True)
    return out.read_bytes()


@pytest.mark.parametrize("maker", ["webdataset", "pax", "gnu", "posix"])
def test_tars_written_by_other_tools_read_as_tarfile_reads_them(maker, tmp_path):
    data = {"webdataset": lambda: webdataset_tar(tmp_path), "pax": pax_tar,
            "gnu": lambda: gnu_tar(tmp_path, "gnu"), "posix": lambda: gnu_tar(tmp_path, "posix")}[maker]()
    got, err = read(data)
    ref = reference_samples(data)
    assert err is None and len(ref) >= 3 and got == ref


def test_truncated_anywhere_raises_after_the_complete_samples(tmp_path):
    data = webdataset_tar(tmp_path)
    ref = reference_samples(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        last = t.getmembers()[-1]
    marker_end = last.offset_data + -(-last.size // 512) * 512 + 512  # the first zero block ends here
    assert read(data[:marker_end]) == (ref, None)                     # the record padding after it is optional
    for cut in range(0, marker_end, 11):
        got, err = read(data[:cut])
        assert err is not None, cut                                       # never a silent short read
        assert got == ref[:len(got)] and len(got) < len(ref), cut          # the samples before the damage, intact


def test_a_damaged_header_mid_archive_raises_where_tarfile_streams_stop_silently(tmp_path):
    data = bytearray(webdataset_tar(tmp_path))
    ref = reference_samples(bytes(data))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as t:
        third = t.getmembers()[6].offset                                  # the header of sample 2's first member
    data[third + 3] ^= 0xFF                                               # a flipped byte in its name
    with tarfile.open(fileobj=io.BytesIO(bytes(data)), mode="r|*") as t:  # the stream reader: no error, fewer files
        assert len([m for m in t if m.isfile()]) == 6
    got, err = read(bytes(data))
    assert err == f"bad header checksum at byte {third} (damaged tar)"
    assert got == ref[:1]  # sample 1 was still open when the damage came: dropped, not yielded half
