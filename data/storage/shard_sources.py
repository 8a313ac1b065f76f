"""Input layouts for the shard writer: flat folder, ImageNet class folders, ADE20K pairs, file list.

Each ``list_*`` returns ``(items, label_map or None, skipped)`` where ``skipped`` lists inputs
that cannot become samples (e.g. an image without its annotation), with the reason.
"""
from __future__ import annotations

import json
from pathlib import Path

from beit.data.storage.shard_format import IMAGE_EXTS, make_key
from beit.data.storage.shard_writer import Item

Listing = tuple[list[Item], "dict[str, int] | None", list[dict[str, str]]]


def images_under(root: Path) -> list[Path]:
    """Every image file under ``root`` (by extension, recursive, sorted; hidden files and folders left out)."""
    exts = {"." + e for e in IMAGE_EXTS} | {".jpe"}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _need_dir(root: Path, what: str) -> None:
    if not root.is_dir():
        raise ValueError(f"{what} {root} is not a folder")


def load_label_map(path: str | Path) -> dict[str, int]:
    """A class-name -> int JSON map (as written by the ImageNet layout)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
        raise ValueError(f"{path}: expected a JSON object of class name -> integer label")
    return data


def list_folder(root: str | Path) -> Listing:
    """Every image under ``root`` (recursive), unlabelled; key = relative path (``make_key``)."""
    root = Path(root)
    _need_dir(root, "source")
    files = images_under(root)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) found under {root}")
    return [Item(key=make_key(str(p.relative_to(root))), image=str(p)) for p in files], None, []


def list_imagenet(root: str | Path, label_map: dict[str, int] | None = None) -> Listing:
    """``root/<class>/**/<image>``: labels from the sorted class folder names (or ``label_map``)."""
    root = Path(root)
    _need_dir(root, "source")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (ImageNet layout is root/<class>/<image>); "
                         f"use --layout folder for unlabelled images")
    if label_map is None:
        label_map = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in classes if c not in label_map]
    if unknown:
        raise ValueError(f"class folders {unknown[:5]} are not in the given label map; "
                         f"use the class_index.json written with the training split")
    items = [Item(key=make_key(str(p.relative_to(root))), image=str(p), label=label_map[c])
             for c in classes for p in images_under(root / c)]
    if not items:
        raise ValueError(f"no images found in the class folders of {root}")
    return items, label_map, []


def list_ade20k(root: str | Path, split: str = "") -> Listing:
    """``root/images[/split]/<x>.jpg`` paired with ``root/annotations[/split]/<x>.png``."""
    root = Path(root)
    img_dir, ann_dir = root / "images", root / "annotations"
    if split:
        img_dir, ann_dir = img_dir / split, ann_dir / split
    _need_dir(img_dir, "ADE20K image folder")
    _need_dir(ann_dir, "ADE20K annotation folder")
    items, skipped = [], []
    for p in images_under(img_dir):
        rel = p.relative_to(img_dir)
        ann = (ann_dir / rel).with_suffix(".png")
        key = make_key(str(rel))
        if ann.is_file():
            items.append(Item(key=key, image=str(p), seg=str(ann)))
        else:
            skipped.append({"key": key, "reason": f"no annotation {ann}", "path": str(p)})
    if not items:
        raise ValueError(f"no image/annotation pairs found under {img_dir} and {ann_dir}")
    return items, None, skipped


def list_filelist(path: str | Path, label_map: dict[str, int] | None = None) -> Listing:
    """A text file: one image path per line, optionally ``<TAB><label>`` (integer or class name).
    Relative paths are relative to the list's folder; ``#`` starts a comment line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"file list {path} does not exist")
    base = path.parent
    rows: list[tuple[str, Path, str]] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fname, _, lab = line.partition("\t")
        p = Path(fname.strip())
        full = p if p.is_absolute() else base / p
        try:
            rel = str(full.relative_to(base))
        except ValueError:
            rel = str(full).lstrip("/")
        rows.append((make_key(rel), full, lab.strip()))
    if not rows:
        raise ValueError(f"file list {path} names no images")
    names = sorted({lab for _, _, lab in rows if lab and not lab.lstrip("-").isdigit()})
    if names and label_map is None:
        if any(lab.lstrip("-").isdigit() for _, _, lab in rows if lab):
            raise ValueError(f"{path}: labels mix integers and class names; use one kind or pass --label_map")
        label_map = {c: i for i, c in enumerate(names)}
    missing = [c for c in names if c not in (label_map or {})]
    if missing:
        raise ValueError(f"{path}: classes {missing[:5]} are not in the label map")

    def to_int(lab: str) -> int | None:
        if not lab:
            return None
        return int(lab) if lab.lstrip("-").isdigit() else label_map[lab]

    items = [Item(key=key, image=str(full), label=to_int(lab)) for key, full, lab in rows]
    return items, label_map, []
