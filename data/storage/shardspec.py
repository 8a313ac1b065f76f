"""Shard specs -> shard lists, checked at start-up; per-shard sample counts.

A spec is a string or a list of strings. Each string may hold several comma-separated parts
(commas inside ``{...}`` belong to brace patterns), each part a path, a brace pattern
(``train-{000000..000099}.tar``), a glob (``train-*.tar``), a folder (all ``*.tar`` inside) or,
only with ``allow_remote=True``, an ``http(s)://`` URL or a ``pipe:cmd`` (``beit.data.storage.remote`` opens
them). A ``pipe:`` spec runs a shell command, so it is never accepted by surprise. Other schemes
(``gs://``, ``s3://``) are refused with the ``pipe:`` / https form that reads them.

Sample counts come from ``manifest.json``: the one given (``--manifest``, a path or URL), else the one
beside the shards (read locally, fetched for http(s) shards); local shards missing from every
manifest are counted from their tar headers.
"""
from __future__ import annotations

import glob
import json
import re
import tarfile
from pathlib import Path
from typing import Any, Sequence

from braceexpand import braceexpand

from beit.data.storage.remote import RETRIES, is_http, read_bytes, url_name, url_parent
from beit.data.storage.shard_format import MANIFEST_NAME, manifest_counts, read_manifest, split_member_name

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


def _no_shards_in(folder: Path) -> str:
    """Why a folder is not shards, and what to do: a folder of images is --data's, or the source of shards
    written somewhere else (never into the images' own folder)."""
    from beit.data.storage.shard_format import IMAGE_EXTS

    exts = {"." + e for e in IMAGE_EXTS}
    if any(p.suffix.lower() in exts for p in folder.rglob("*") if p.is_file()):
        return (f"folder {str(folder)!r} holds images, not .tar shards: the training commands take it as "
                f"--data {folder}; for shards write them elsewhere, e.g. `beit shards write --source {folder} "
                f"--out shards/{folder.resolve().name or 'images'}`, and pass that folder")
    return (f"folder {str(folder)!r} holds no .tar shards; write some with `beit shards write --source ... --out "
            f"{folder}`")


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
                    if not (is_http(url) or url.startswith("pipe:")):
                        scheme = url.split(":", 1)[0]
                        raise ValueError(
                            f"shard spec {url!r}: {scheme}:// is not read directly. Read it through its provider's "
                            f"command line ('pipe:gsutil cat gs://bucket/x.tar', 'pipe:aws s3 cp s3://bucket/x.tar -') "
                            f"or as an https:// URL (public or presigned objects); both need "
                            f"--allow_remote_shards true")
                    if is_http(url) and any(c in url.split("?", 1)[0] for c in "*["):
                        raise ValueError(f"shard spec {url!r}: a glob cannot be listed over http(s); name the shards "
                                         f"with a brace pattern, e.g. '.../train-{{000000..000099}}.tar'")
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
                        raise ValueError(_no_shards_in(Path(path)))
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


def load_manifest(where: str, *, retries: int = RETRIES) -> dict[str, Any]:
    """A manifest.json from a local path or an http(s) URL (ValueError saying what went wrong)."""
    try:
        data = json.loads(read_bytes(where, retries=retries) if is_http(where) else Path(where).read_bytes())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the manifest {where}: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("shards"), list):
        raise ValueError(f"{where} is not a shard manifest (a JSON object with a 'shards' list, as `beit shards "
                         f"write` writes)")
    return data


def shard_manifest(shards: Sequence[str], manifest: str | None = None, *,
                   retries: int = RETRIES) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, where it came from) for a shard list: ``manifest`` if given, else the manifest.json beside
    the first shard (read locally, fetched for an http(s) shard); (None, None) when there is none."""
    if manifest:
        return load_manifest(manifest, retries=retries), manifest
    if not shards or (is_remote(shards[0]) and not is_http(shards[0])):
        return None, None
    first = shards[0]
    where = url_parent(first) + MANIFEST_NAME if is_http(first) else str(Path(first).parent / MANIFEST_NAME)
    if not is_http(first) and not Path(where).is_file():
        return None, None
    try:
        return load_manifest(where, retries=retries), where
    except ValueError:
        if is_http(first):
            return None, None
        raise


def resolve_sample_counts(shards: Sequence[str], manifest: str | None = None, *,
                          retries: int = RETRIES) -> tuple[list[int] | None, str]:
    """(per-shard sample counts, "") or (None, why) when a remote shard's count is unknown.

    Counts come from ``manifest`` (a path or URL; shards matched by file name) if given, else from the
    manifest.json beside each shard (local folders read, http(s) folders fetched once each); local
    shards missing from every manifest are counted by reading their tar headers."""
    by_name: dict[str, int] = {}
    local: list[tuple[Path, dict]] = []
    if manifest:
        m = load_manifest(manifest, retries=retries)
        by_name = {Path(s["name"]).name: int(s["samples"]) for s in m["shards"]}
        if not is_http(manifest):
            local.append((Path(manifest).parent, m))
    for d in sorted({str(Path(s).parent) for s in shards if not is_remote(s)}):
        m = read_manifest(d)
        if m is not None:
            local.append((Path(d), m))
    known = manifest_counts(local)
    fetched: dict[str, dict[str, int] | str] = {}   # http folder -> {name: count}, or why it has none
    counts, unknown = [], []
    for s in shards:
        if not is_remote(s):
            c = known.get(str(Path(s).resolve()))
            counts.append(c if c is not None else count_tar_samples(s))
            continue
        c = by_name.get(url_name(s))
        if c is None and is_http(s) and not manifest:
            folder = url_parent(s)
            if folder not in fetched:
                try:
                    m = load_manifest(folder + MANIFEST_NAME, retries=retries)
                    fetched[folder] = {Path(x["name"]).name: int(x["samples"]) for x in m["shards"]}
                except ValueError as e:
                    fetched[folder] = str(e)
            found = fetched[folder]
            c = found.get(url_name(s)) if isinstance(found, dict) else None
        if c is None:
            unknown.append(s)
        counts.append(c)
    if not unknown:
        return counts, ""
    if manifest:
        why = f"{len(unknown)} shard(s) are not in --manifest {manifest} (e.g. {url_name(unknown[0])})"
    else:
        problems = sorted({v for v in fetched.values() if isinstance(v, str)})
        missing = [s for s in unknown if isinstance(fetched.get(url_parent(s)), dict)]
        why = "; ".join(problems[:2] + ([f"{len(missing)} shard(s) are not in the manifest beside them (e.g. "
                                         f"{missing[0]})"] if missing else []))
        if not why:
            why = f"{len(unknown)} shard(s) have no manifest.json beside them (e.g. {unknown[0]})"
    return None, why


def shard_sample_counts(shards: Sequence[str], manifest: str | None = None, *,
                        retries: int = RETRIES) -> list[int] | None:
    """Per-shard sample counts (see ``resolve_sample_counts``); None when a remote shard has no count."""
    return resolve_sample_counts(shards, manifest, retries=retries)[0]
