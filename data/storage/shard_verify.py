"""Check shards against their manifest and decode every sample, reporting bad ones by key."""
from __future__ import annotations

import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from beit.data.loading.decode import BadSample, open_image
from beit.data.storage.shard_format import image_ext, iter_tar_samples, read_manifest, sha256_file


@dataclass
class ShardReport:
    shard: str
    samples: int = 0
    problems: list[str] = field(default_factory=list)      # shard-level (hash, count, tar damage)
    bad_samples: list[tuple[str, str]] = field(default_factory=list)  # (key, reason: detail)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.bad_samples


def check_sample(sample: dict) -> None:
    """Raise BadSample if the sample's image, label or annotation is unusable."""
    ext = image_ext(sample)
    if ext is None:
        raise BadSample("no_image", f"members: {sorted(k for k in sample if not k.startswith('__'))}")
    img, _ = open_image(sample[ext], lazy_jpeg=False)  # decodes every pixel
    if "cls" in sample:
        try:
            int(sample["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise BadSample("bad_label", f"cls={sample['cls'][:20]!r}") from None
    if "seg.png" in sample:
        seg, _ = open_image(sample["seg.png"], lazy_jpeg=False)
        if seg.size != img.size:
            raise BadSample("corrupt", f"annotation is {seg.size}, image is {img.size}")


def verify_shard(path: str, expected: dict | None = None, decode: bool = True) -> ShardReport:
    """Read one shard; compare with its manifest entry (samples, bytes, sha256) when given."""
    rep = ShardReport(shard=path)
    p = Path(path)
    if not p.is_file():
        rep.problems.append("missing file")
        return rep
    if expected is not None:
        if p.stat().st_size != expected["bytes"]:
            rep.problems.append(f"size {p.stat().st_size} bytes, manifest says {expected['bytes']}")
        digest = sha256_file(p)
        if digest != expected["sha256"]:
            rep.problems.append(f"sha256 {digest[:12]}... does not match the manifest's {expected['sha256'][:12]}...")
    try:
        with open(p, "rb") as f:
            for sample in iter_tar_samples(f):
                rep.samples += 1
                if decode:
                    try:
                        check_sample(sample)
                    except BadSample as e:
                        rep.bad_samples.append((sample["__key__"], str(e)))
    except (tarfile.TarError, EOFError, OSError) as e:
        rep.problems.append(f"unreadable tar after {rep.samples} samples: {type(e).__name__}: {e}")
    if expected is not None and rep.samples != expected["samples"]:
        rep.problems.append(f"{rep.samples} samples, manifest says {expected['samples']}")
    return rep


def _verify_star(args):
    return verify_shard(*args)


def verify_folder(folder: str | Path, decode: bool = True, workers: int = 1) -> tuple[list[ShardReport], list[str]]:
    """Verify every shard of ``folder`` (its manifest's list, else every *.tar).

    Returns (per-shard reports, folder-level problems such as tars missing from the manifest).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of shards")
    manifest = read_manifest(folder)
    problems: list[str] = []
    on_disk = sorted(p.name for p in folder.glob("*.tar"))
    if manifest is None:
        problems.append("no manifest.json: hashes and counts not checked")
        jobs = [(str(folder / n), None, decode) for n in on_disk]
    else:
        listed = {s["name"] for s in manifest["shards"]}
        extra = [n for n in on_disk if n not in listed]
        if extra:
            problems.append(f"tar files not in the manifest: {extra[:5]}")
        for name, w in manifest.get("writes", {}).items():
            if not w.get("complete", True):
                problems.append(f"the '{name}' write did not finish (resume it: the same write command with --resume "
                                "true)")
        jobs = [(str(folder / s["name"]), s, decode) for s in manifest["shards"]]
        if sum(s["samples"] for s in manifest["shards"]) != manifest.get("num_samples"):
            problems.append("manifest num_samples does not equal the sum of its shards")
    if not jobs:
        problems.append("no shards found")
        return [], problems
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            reports = list(pool.map(_verify_star, jobs))
    else:
        reports = [verify_shard(*j) for j in jobs]
    return reports, problems
