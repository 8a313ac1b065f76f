"""Distillation data: each labelled batch goes out together with a batch of the unlabelled pretraining
shards (label -1), which the teacher labels softly. The unlabelled stream runs its own epochs."""
from __future__ import annotations

import torch

UNLABELLED = -1


class UnlabelledMap:
    """``map_fn`` for unlabelled shards: (PIL image, sample) -> {"image", "label": -1}; any stored label is ignored."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, sample: dict) -> dict:
        return {"image": self.transform(image), "label": UNLABELLED}


class PairedLoader:
    """``len`` and epochs of the labelled loader; every batch = labelled batch + the next unlabelled one."""

    def __init__(self, labelled, unlabelled):
        self.labelled, self.unlabelled = labelled, unlabelled
        self._u_iter = None

    def __len__(self) -> int:
        return len(self.labelled)

    def set_epoch(self, epoch: int) -> None:
        self.labelled.set_epoch(epoch)

    def describe(self) -> str:
        return f"{self.labelled.describe()}; each batch beside unlabelled images ({self.unlabelled.describe()})"

    @property
    def notes(self) -> list[str]:
        return [*getattr(self.labelled, "notes", []), *("unlabelled: "
                                                        f"{n}" for n in getattr(self.unlabelled, "notes", []))]

    @property
    def coverage(self) -> dict:
        return getattr(self.labelled, "coverage", {})

    def _next_unlabelled(self) -> dict:
        for _ in range(2):
            if self._u_iter is None:
                self._u_iter = iter(self.unlabelled)  # continues where it stopped, or starts its next epoch
            batch = next(self._u_iter, None)
            if batch is not None:
                return batch
            self._u_iter = None
        raise RuntimeError("the unlabelled shards gave no batch; check --unlabelled_shards")

    def __iter__(self):
        for lb in self.labelled:
            ub = self._next_unlabelled()
            dev = lb["image"].device  # the memory cache's batches are on the device already
            yield {"image": torch.cat([lb["image"], ub["image"].to(dev)]),
                   "label": torch.cat([torch.as_tensor(lb["label"]), torch.as_tensor(ub["label"]).to(dev)])}

    def state_dict(self) -> dict:
        return {"labelled": self.labelled.state_dict(), "unlabelled": self.unlabelled.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        from beit.data.loading.stream import state_part
        self.labelled.load_state_dict(state_part(state, "labelled"))
        self.unlabelled.load_state_dict(state_part(state, "unlabelled"))
        self._u_iter = None

    def metrics(self, prefix: str = "data/") -> dict:
        out = dict(self.labelled.metrics(prefix))
        for k, v in self.unlabelled.metrics(prefix + "unlabelled/").items():
            out[k] = v
        return out


def build_unlabelled_loader(cfg, accelerator, transform):
    """The unlabelled training stream (``cfg.unlabelled_shards``), ``cfg.unlabelled_batch_size`` per batch."""
    from beit.data.loading.global_order import build_loader_for_order
    return build_loader_for_order(getattr(cfg, "data_order", "shards"), cfg.unlabelled_shards,
                                  allow_remote=cfg.allow_remote_shards, remote_retries=cfg.remote_retries,
                                  map_fn=UnlabelledMap(transform),
                                  batch_size=cfg.unlabelled_batch_size or cfg.batch_size,
                                  num_workers=cfg.loader_workers, rank=accelerator.process_index,
                                  world_size=accelerator.num_processes, seed=cfg.seed + 1,
                                  max_bad_fraction=cfg.max_bad_fraction)
