"""kNN classification on encoder features: the pretraining health metric and ``beit compare``'s kNN.

Features are the encoder's patch tokens after the final norm, mean-pooled (the CLS token is left
out: BEiT pretraining puts no loss on its output, so it says little about the encoder), then
l2-normalised. A held-out image's class is the similarity-weighted vote of its k nearest labelled
images (cosine similarity, weights exp(sim / T), as the kNN monitors of DINO-style SSL code).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from beit.data.pipelines.transforms import TwoViewTransform, encoder_input


class CentreView:
    """``map_fn`` for a held-out loader: the whole image (centre square), resized to ``image_size``,
    as uint8 [3, S, S], plus the integer label stored under ``cls`` (-1 when there is none)."""

    def __init__(self, image_size: int):
        self.view = TwoViewTransform(image_size=image_size, tokenizer_size=1, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                                     color_jitter=0.0, hflip=0.0, tokenizer_interpolation="bilinear")
        self.image_size = image_size

    def __call__(self, img, sample: dict) -> dict:
        enc = self.view(img)[0]  # (the 1 px tokenizer view is dropped)
        raw = sample.get("cls")
        label = int(raw.decode("ascii").strip()) if isinstance(raw, (bytes, bytearray)) else -1
        return {"image": enc, "label": label}


def load_views(shards: list[str], image_size: int, accelerator=None,
               batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, 3, S, S], labels [N]) of every decodable image of this process's share of
    ``shards`` (all of them without an accelerator); undecodable ones are left out."""
    from torch.utils.data import DataLoader

    from beit.data.loading.heldout import HeldOutStream, good_rows
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    stream = HeldOutStream(list(shards), CentreView(image_size), rank=rank, world_size=world)
    images, labels = [], []
    for batch in DataLoader(stream, batch_size=batch_size, num_workers=0):
        ok = good_rows(batch)
        images.append(batch["image"][ok])
        labels.append(batch["label"][ok])
    if not images:
        return torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    return torch.cat(images), torch.cat(labels).long()


@torch.no_grad()
def encoder_features(model, images: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    """l2-normalised mean-pooled patch tokens of ``model.forward_features`` (a ``BeitPretrainModel``;
    no mask) for uint8 images, as float32 on the CPU. The model is put back in its previous mode."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = encoder_input(images[i:i + batch_size].to(device))
        out.append(F.normalize(model.forward_features(x)[:, 1:].float().mean(1), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.cls_token.shape[-1])


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, *, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024) -> torch.Tensor:
    """Class of each query row: similarity-weighted vote of its k nearest training rows (rows are
    l2-normalised, so the dot product is the cosine similarity)."""
    if len(train_feats) == 0:
        raise ValueError("kNN needs at least one labelled training image")
    c = int(num_classes or int(train_labels.max()) + 1)
    k = min(k, len(train_feats))
    preds = []
    for i in range(0, len(query), chunk):
        sim = query[i:i + chunk] @ train_feats.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), c, dtype=sim.dtype)
        votes.scatter_add_(1, train_labels[idx], (top / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


class KnnMonitor:
    """The pretraining health metric: kNN top-1 of the current encoder on a labelled held-out set,
    with a labelled training set as the memory bank. Both sets are decoded once (uint8, kept in
    memory: N x 3 x S x S bytes); each call is one forward pass over them. Every rank scores its
    share and the features are gathered, so all ranks call ``__call__`` together."""

    def __init__(self, train_shards: list[str], val_shards: list[str], image_size: int, accelerator, *,
                 k: int = 20, temperature: float = 0.07):
        self.accelerator, self.k, self.temperature = accelerator, k, temperature
        t0 = time.time()
        self.train_images, self.train_labels = load_views(train_shards, image_size, accelerator)
        self.val_images, self.val_labels = load_views(val_shards, image_size, accelerator)
        all_train = self._gather(self.train_labels)
        all_val = self._gather(self.val_labels)
        if len(all_train) == 0 or len(all_val) == 0 or (all_train < 0).any() or (all_val < 0).any():
            raise ValueError("the kNN health metric needs labelled images (a 'cls' entry per sample) in both "
                             "--knn_train_shards and --knn_val_shards")
        self.num_classes = int(max(all_train.max(), all_val.max())) + 1
        # the baseline of always answering the scored set's most frequent class (an upper bound for any constant
        # answer; the memory bank's majority class can be rarer in the scored set and flatter the encoder)
        self.majority_acc = float(torch.bincount(all_val, minlength=self.num_classes).max() / len(all_val))
        self.n_train, self.n_val = len(all_train), len(all_val)
        self.load_seconds = time.time() - t0

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return t
        from accelerate.utils import gather_object
        return torch.cat(gather_object([t]))

    def __call__(self, model) -> dict:
        """{"knn_acc", "knn_majority_acc", "knn_seconds"} for ``model`` (the unwrapped pretraining model)."""
        t0 = time.time()
        dev = self.accelerator.device
        train = self._gather(encoder_features(model, self.train_images, dev))
        val = self._gather(encoder_features(model, self.val_images, dev))
        labels, val_labels = self._gather(self.train_labels), self._gather(self.val_labels)
        pred = knn_predict(train, labels, val, k=self.k, temperature=self.temperature, num_classes=self.num_classes)
        return {"knn_acc": float((pred == val_labels).double().mean()), "knn_majority_acc": self.majority_acc,
                "knn_seconds": time.time() - t0}


class KnnHealth:
    """Runs the kNN health metric every ``every`` optimizer steps (and at the last), logs it beside
    the masked-token metrics and keeps its total cost."""

    def __init__(self, monitor, logger, every: int, total_steps: int):
        self.monitor, self.logger, self.every, self.total_steps = monitor, logger, every, total_steps
        self.seconds, self.last, self.calls = 0.0, None, 0

    def __call__(self, model, step: int) -> None:
        if step and step % self.every and step != self.total_steps:
            return
        res = self.monitor(model)
        self.seconds += res["knn_seconds"]
        self.calls += 1
        self.last = res
        self.logger.log({"knn/acc": res["knn_acc"], "knn/majority_acc": res["knn_majority_acc"],
                         "knn/seconds": res["knn_seconds"]}, step=step)
        self.logger.info(f"step {step}: kNN top-1 {100 * res['knn_acc']:.1f}% vs majority class "
                         f"{100 * res['knn_majority_acc']:.1f}% ({self.monitor.n_val} held-out images, "
                         f"{res['knn_seconds']:.2f}s)")

    def summary(self, train_seconds: float) -> dict:
        out = {"knn/evaluations": self.calls, "knn/seconds_total": round(self.seconds, 2),
               "knn/load_seconds": round(self.monitor.load_seconds, 2),
               "knn/cost_fraction": round(self.seconds / train_seconds, 4) if train_seconds else None}
        if self.last is not None:
            out.update({"knn/acc": self.last["knn_acc"], "knn/majority_acc": self.last["knn_majority_acc"]})
        return out


def build_knn_health(cfg, accelerator, logger, total_steps: int) -> KnnHealth | None:
    """The kNN health metric of a pretraining config, or None when no kNN shards are set. ``knn_every`` 0: about
    ten evaluations a run, on logging steps, so each sits beside a masked-token accuracy record. Shards without
    labels are bad input (``SetupError``)."""
    if not cfg.knn_train_shards:
        return None
    from beit.data.storage.shardspec import expand_shards
    from beit.runtime.faults import SetupError
    try:
        remote = cfg.allow_remote_shards
        monitor = KnnMonitor(expand_shards(cfg.knn_train_shards, allow_remote=remote),
                             expand_shards(cfg.knn_val_shards, allow_remote=remote), cfg.image_size, accelerator,
                             k=cfg.knn_k)
    except ValueError as e:
        raise SetupError(str(e)) from None
    every = cfg.knn_every or max(cfg.log_every, round(total_steps / 10 / cfg.log_every) * cfg.log_every)
    logger.info(f"kNN health metric: {monitor.n_train} labelled images as memory bank, {monitor.n_val} scored, "
                f"k={cfg.knn_k}, mean-pooled patch features, every {every} steps (decoded in "
                f"{monitor.load_seconds:.1f}s)")
    return KnnHealth(monitor, logger, every, total_steps)
