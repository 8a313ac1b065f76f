"""What ``beit predict --data`` reads, decoded exactly as the held-out evaluation decodes it (``open_image``: any
mode to RGB, EXIF upright) and preprocessed by the model's own transform.

* a folder of images (recursive); when every image sits in a sub-folder named like one of the model's classes,
  the sub-folder is the label (mapped by name to the model's class index);
* shards (a pattern, a list, or a folder of ``.tar``): labels from ``cls`` (checked against the model's classes
  when the manifest has a label map), ``seg.png`` annotations for a segmenter.

A file or sample that cannot be used comes out as a row with its reason (``bad``), so it is counted and named,
never dropped. Batches are made here, in the loader's workers, in the order of the files / shards.
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from beit.data.loading.decode import BadSample, open_image


@dataclass
class Inputs:
    kind: str                                   # "folder" | "shards"
    source: str
    files: list[Path] = field(default_factory=list)
    labels: list[int] | None = None             # a labelled folder: per file, the model's class index
    root: Path | None = None
    shards: list[str] = field(default_factory=list)
    labelled: bool = False
    total: int | None = None                    # images to expect (None: shards without a manifest)
    skipped: list[str] = field(default_factory=list)   # files of the folder without an image extension
    note: str = ""

    def describe(self) -> str:
        what = (f"{len(self.files)} images in {self.source}" if self.kind == "folder"
                else f"{len(self.shards)} shard(s) {self.source}" + (f", {self.total} images" if self.total else ""))
        labels = "labelled" if self.labelled else "no labels"
        skipped = (f"; {len(self.skipped)} file(s) without an image extension left out "
                   f"({', '.join(self.skipped[:3])}{', ...' if len(self.skipped) > 3 else ''})" if self.skipped else "")
        return f"{what} ({labels}{'; ' + self.note if self.note else ''}){skipped}"


def _folder(root: Path, class_names: list[str], segmenter: bool) -> Inputs:
    from beit.data.storage.shard_sources import images_under
    files = images_under(root)
    images = set(files)
    others = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p not in images
                    and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        if any(o.endswith(".tar") for o in others):
            raise ValueError(f"--data {root} holds shards, no images: pass them as a pattern, e.g. '{root}/*.tar' or "
                             f"'{root}/test-*.tar'")
        raise ValueError(f"--data {root}: no images found (looked for image file extensions, recursively)")
    inputs = Inputs("folder", str(root), files=files, root=root, total=len(files), skipped=others)
    tops = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    if segmenter or not tops:
        return inputs
    at_root = [p for p in files if len(p.relative_to(root).parts) == 1]
    unknown = [t for t in tops if t not in class_names]
    if at_root or unknown:
        inputs.note = ("sub-folders are not all the model's classes: " + ", ".join(unknown[:5]) if unknown
                       else f"{len(at_root)} images outside class sub-folders")
        return inputs
    index = {n: i for i, n in enumerate(class_names)}
    inputs.labels = [index[p.relative_to(root).parts[0]] for p in files]
    inputs.labelled = True
    return inputs


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def _shards(spec: str, class_names: list[str], segmenter: bool) -> Inputs:
    from beit.data.pipelines.labelled import class_names_of, manifest_label_map
    from beit.data.storage.shard_format import iter_tar_samples, read_manifest
    from beit.data.storage.shardspec import expand_shards
    try:
        shards = expand_shards(spec)
    except ValueError as e:
        raise ValueError(f"--data {spec}: {e}") from None
    label_map, manifest = manifest_label_map(spec)
    if label_map is not None and not segmenter and class_names_of(label_map) != class_names:
        theirs = class_names_of(label_map)
        raise ValueError(f"--data {spec}: the shards' labels ({manifest}: {_few(theirs)}) are not the model's classes "
                         f"({_few(class_names)}): their label numbers would mean other classes")
    counts = {}
    for folder in {Path(s).parent for s in shards}:
        for entry in (read_manifest(folder) or {}).get("shards", []):
            counts[str(folder / entry["name"])] = int(entry["samples"])
    total = sum(counts[s] for s in shards) if all(s in counts for s in shards) else None
    first = {}
    try:
        with open(shards[0], "rb") as f:
            first = next(iter_tar_samples(f), {})
    except (tarfile.TarError, OSError):
        pass
    labelled = ("seg.png" in first) if segmenter else (label_map is not None or "cls" in first)
    return Inputs("shards", spec, shards=shards, labelled=labelled, total=total)


def find_inputs(data: str, class_names: list[str], segmenter: bool = False) -> Inputs:
    """``--data``: a folder with images, else shards (see the module docstring)."""
    root = Path(data)
    if root.is_dir():
        from beit.data.storage.shard_sources import images_under
        if images_under(root) or not any(root.glob("*.tar")):
            return _folder(root, class_names, segmenter)
    return _shards(data, class_names, segmenter)


class PredictStream(IterableDataset):
    """Batches (lists of items) of ``inputs``: folder chunks or whole shards are dealt out to the workers in turn,
    so with a ``DataLoader`` (``batch_size=None``) a folder's batches come back in file order. An item:
    ``name``, ``image`` (the model's input, or None), ``size`` (h, w of the decoded image), ``label`` (a class
    index, an annotation [H, W], or None), ``bad`` ("" or the reason) and ``detail``."""

    def __init__(self, inputs: Inputs, to_input, batch_size: int, num_classes: int, reduce_zero_label: bool = True):
        super().__init__()
        self.inputs, self.to_input, self.batch_size = inputs, to_input, batch_size
        self.num_classes, self.reduce_zero_label = num_classes, reduce_zero_label

    def units(self) -> int:
        """Work units dealt to the workers: folder chunks or shards."""
        if self.inputs.kind == "folder":
            return -(-len(self.inputs.files) // self.batch_size)
        return len(self.inputs.shards)

    def _item(self, name: str, data: bytes | None, sample: dict | None, label: int | None) -> dict:
        from beit.data.pipelines.labelled import parse_label
        from beit.data.pipelines.segmentation import image_labels
        item = {"name": name, "image": None, "size": None, "label": label, "bad": "", "detail": ""}
        try:
            if data is None:
                raise BadSample("no_image", f"members: {sorted(k for k in sample if not k.startswith('__'))}")
            img, _ = open_image(data, lazy_jpeg=False)
            item["size"] = (img.size[1], img.size[0])
            if sample is not None and self.inputs.labelled:
                item["label"] = (image_labels(img, sample, self.num_classes, self.reduce_zero_label)
                                 if "seg.png" in sample else parse_label(sample, self.num_classes))
            item["image"] = self.to_input(img)
        except BadSample as e:
            item.update(bad=e.reason, detail=e.detail, image=None)
        return item

    def _folder_batches(self, chunks: list[int]):
        files, labels = self.inputs.files, self.inputs.labels
        for c in chunks:
            batch = []
            for i in range(c * self.batch_size, min(len(files), (c + 1) * self.batch_size)):
                name = str(files[i].relative_to(self.inputs.root))
                try:
                    data = files[i].read_bytes()
                except OSError as e:
                    batch.append({"name": name, "image": None, "size": None, "label": None, "bad": "unreadable",
                                  "detail": str(e)})
                    continue
                batch.append(self._item(name, data, None, labels[i] if labels else None))
            yield batch

    def _shard_batches(self, shard_ids: list[int]):
        from beit.data.storage.shard_format import image_ext, iter_tar_samples
        batch = []
        for s in shard_ids:
            shard = self.inputs.shards[s]
            try:
                with open(shard, "rb") as f:
                    for sample in iter_tar_samples(f):
                        ext = image_ext(sample)
                        batch.append(self._item(f"{shard}:{sample['__key__']}", sample.get(ext), sample, None))
                        if len(batch) == self.batch_size:
                            yield batch
                            batch = []
            except (tarfile.TarError, EOFError, OSError) as e:
                batch.append({"name": shard, "image": None, "size": None, "label": None, "bad": "tar_error",
                              "detail": f"{type(e).__name__}: {e} (the samples before the damage were read)"})
        if batch:
            yield batch

    def __iter__(self):
        info = get_worker_info()
        mine = list(range(self.units()))
        if info is not None:
            mine = mine[info.id::info.num_workers]
        return self._folder_batches(mine) if self.inputs.kind == "folder" else self._shard_batches(mine)


def _as_is(batch):
    return batch


def batches(stream: PredictStream, num_workers: int) -> DataLoader:
    """The stream's batches, decoded in up to ``num_workers`` worker processes (one per work unit at most)."""
    workers = min(num_workers, stream.units())
    return DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_as_is,
                      persistent_workers=False)
