"""Shard specs -> shard lists, checked at start-up; per-shard sample counts.

A spec is a string or a list of strings. Each string may hold several comma-separated parts
(commas inside ``{...}`` belong to brace patterns), each part a path, a brace pattern
(``train-{000000..000099}.tar``), a glob (``train-*.tar``), a folder (all ``*.tar`` inside) or,
only with ``allow_remote=True``, a URL (``https://...``, ``pipe:cmd``, ``gs://...``), which
webdataset's ``gopen`` opens. A ``pipe:`` spec runs a shell command, so it is never accepted
by surprise.
"""
from __future__ import annotations

import glob
import json
import re
import tarfile
from pathlib import Path
from typing import Sequence

from braceexpand import braceexpand

from beit.data.storage.shard_format import manifest_counts, read_manifest, split_member_name

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


def is_remote(url: str) -> bool:
    m = _SCHEME.match(url)
    return bool(m) and m.group(1).lower() != "file" and len(m.group(1)) > 1  # "C:" is a drive


def _split_top_level(spec: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in spec:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def expand_shards(spec: str | Sequence[str], *, allow_remote: bool = False) -> list[str]:
    """Expand a shard spec to a list of shard paths/URLs; local files must exist.

    Raises ValueError with a message that says what is wrong and how to fix it.
    """
    if isinstance(spec, (str, Path)):
        spec = [str(spec)]
    if not spec:
        raise ValueError("no shards given: pass a path, a brace pattern like 'dir/train-{000000..000009}.tar', "
                         "a glob or a folder of .tar shards")
    out: list[str] = []
    for item in spec:
        for part in _split_top_level(str(item)):
            for url in braceexpand(part):
                if is_remote(url):
                    if not allow_remote:
                        kind = "runs a shell command" if url.startswith("pipe:") else "reads from the network"
                        raise ValueError(
                            f"shard spec {url!r} {kind}; remote and pipe: shards are off by default. "
                            "Pass --allow_remote_shards true (config: allow_remote_shards: true; Python: "
                            "allow_remote=True) if you mean it.")
                    out.append(url)
                    continue
                path = url[5:] if url.startswith("file:") else url
                if any(c in path for c in "*?["):
                    hits = sorted(glob.glob(path))
                    if not hits:
                        raise ValueError(f"shard pattern {path!r} matches no files (from spec {part!r})")
                    out.extend(hits)
                elif Path(path).is_dir():
                    hits = sorted(str(p) for p in Path(path).glob("*.tar"))
                    if not hits:
                        raise ValueError(f"folder {path!r} holds no .tar shards; write some with "
                                         f"`python -m beit.data.shards write --source ... --out {path}`")
                    out.extend(hits)
                elif not Path(path).is_file():
                    raise ValueError(f"shard {path!r} does not exist (from spec {part!r}); check the path "
                                     f"and the brace range")
                else:
                    out.append(path)
    if not out:
        raise ValueError(f"shard spec {spec!r} expands to no shards")
    if len(set(out)) != len(out):
        dup = sorted({u for u in out if out.count(u) > 1})
        raise ValueError(f"shard spec names some shards twice: {dup[:3]}")
    return out


def count_tar_samples(path: str) -> int:
    """Number of distinct sample keys in a local tar (reads headers only; stops at damage)."""
    keys = set()
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.isfile():
                    keys.add(split_member_name(m.name)[0])
    except (tarfile.TarError, EOFError, OSError):
        pass
    return len(keys)


def shard_sample_counts(shards: Sequence[str], manifest: str | None = None) -> list[int] | None:
    """Per-shard sample counts from ``manifest.json`` beside the shards (or the given one);
    local shards missing from every manifest are counted by reading their tar headers.
    Returns None when some remote shard has no count."""
    manifests = []
    if manifest:
        manifests.append((Path(manifest).parent, json.loads(Path(manifest).read_text())))
    for d in sorted({str(Path(s).parent) for s in shards if not is_remote(s)}):
        m = read_manifest(d)
        if m is not None:
            manifests.append((Path(d), m))
    known = manifest_counts(manifests)
    by_name = {Path(k).name: v for k, v in known.items()} if manifest else {}
    counts = []
    for s in shards:
        if is_remote(s):
            c = by_name.get(Path(s.split("?")[0]).name)
            if c is None:
                return None
        else:
            c = known.get(str(Path(s).resolve()))
            if c is None:
                c = count_tar_samples(s)
        counts.append(c)
    return counts
