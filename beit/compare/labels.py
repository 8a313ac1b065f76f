"""The labelled images of a comparison: read from shards, seeded stratified subsets, written back as shards."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read_labelled(spec: str, what: str) -> list[dict]:
    """``{"key", "data", "ext", "label"}`` of every sample of the shards ``spec``, in shard order.
    Samples without an image or label are an error naming the shard (a comparison needs every label)."""
    from beit.data.loading.decode import BadSample
    from beit.data.loading.stream import image_member
    from beit.data.storage.shard_format import iter_tar_samples
    from beit.data.storage.shardspec import expand_shards

    try:
        shards = expand_shards(spec)
    except ValueError as e:
        raise ValueError(f"--{what}: {e}") from None
    out = []
    for shard in shards:
        with open(shard, "rb") as f:
            for s in iter_tar_samples(f):
                try:
                    ext = image_member(s)
                except BadSample:
                    raise ValueError(f"--{what}: sample {s['__key__']!r} in {shard} has no image") from None
                if "cls" not in s:
                    raise ValueError(f"--{what}: sample {s['__key__']!r} in {shard} has no label ('cls'); "
                                     "write labelled shards (beit shards write with a class-folder layout)")
                out.append({"key": s["__key__"], "data": s[ext], "ext": ext,
                            "label": int(s["cls"].decode("ascii").strip())})
    if not out:
        raise ValueError(f"--{what}: no samples in {spec}")
    return out


def label_map_of(spec: str) -> dict[str, int]:
    """The label_map of the manifest beside the shards, else ``{"0": 0, ...}`` from nothing (filled by the caller)."""
    from beit.data.storage.shardspec import expand_shards
    manifest = Path(expand_shards(spec)[0]).parent / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("label_map") or {}
    return {}


def class_quotas(counts: dict[int, int], fraction: float) -> dict[int, int]:
    """Images per class for a ``fraction`` of the whole: ``round(fraction * total)`` in all (at least one per
    class), shared out by largest remainder: rounding each class on its own drifts from the total (10% of
    4,000 digits came out as 399)."""
    total = max(len(counts), round(fraction * sum(counts.values())))
    exact = {c: fraction * n for c, n in counts.items()}
    quota = {c: min(n, max(1, int(exact[c]))) for c, n in counts.items()}
    # one more image each for the largest remainders; ties to the larger class, then the smaller label
    for c in sorted(counts, key=lambda c: (quota[c] - exact[c], -counts[c], c)):
        if sum(quota.values()) >= total:
            break
        if quota[c] < counts[c] and exact[c] > quota[c]:
            quota[c] += 1
    return quota


def stratified_subset(samples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(chosen, rest): a seeded ``fraction`` of each class (at least one image per class, ``class_quotas``), in
    input order."""
    if fraction >= 1:
        return list(samples), []
    rng = np.random.default_rng(seed)
    labels = np.array([s["label"] for s in samples])
    classes = sorted(set(labels.tolist()))
    quota = class_quotas({c: int((labels == c).sum()) for c in classes}, fraction)
    chosen: list[int] = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        chosen += rng.choice(idx, size=quota[c], replace=False).tolist()
    keep = set(chosen)
    return [samples[i] for i in sorted(keep)], [s for i, s in enumerate(samples) if i not in keep]


def write_labelled(samples: list[dict], out_dir: Path, prefix: str, label_map: dict[str, int], source: str,
                   seed: int) -> str:
    """Write ``samples`` as ``out_dir/<prefix>-*.tar`` (seeded order) and return the shard pattern."""
    from beit.data.storage.shard_writer import Item, WriteOptions, write_shards
    items = [Item(key=s["key"], image=s["data"], ext=s["ext"], label=s["label"]) for s in samples]
    names = label_map or {str(c): c for c in sorted({s["label"] for s in samples})}
    write_shards(items, out_dir, prefix=prefix, opts=WriteOptions(max_samples=1000, shuffle_seed=seed),
                 label_map=names, source=source, overwrite=True, progress=False)
    return str(out_dir / f"{prefix}-*.tar")


def check_disjoint(train: list[dict], test: list[dict]) -> int:
    """Refuse a test set that shares sample keys with the training set; return how many test images
    are byte-identical to a training image (reported: small real sets can hold true duplicates)."""
    import hashlib
    keys = {s["key"] for s in train} & {s["key"] for s in test}
    if keys:
        raise ValueError(f"{len(keys)} test sample key(s) are also training keys (e.g. {sorted(keys)[:3]}): "
                         "the test split must be held out")
    digests = {hashlib.sha256(s["data"]).digest() for s in train}
    return sum(hashlib.sha256(s["data"]).digest() in digests for s in test)
