"""Counts of good and bad samples (by reason and by shard), merged from loader workers.

Workers count into their own ``DataStats`` and send ``pop_delta()`` with each batch; the main
process ``merge``s the deltas and ``check``s the bad fraction against the configured threshold.
"""
from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any

from beit.runtime.faults import RunFault

MAX_EXAMPLES = 20


class DataQualityError(RunFault):
    """Too many bad samples: the data, not the model, needs attention."""


def _empty() -> dict[str, Any]:
    return {"samples": 0, "bad": 0, "bad_by_reason": {}, "converted": {}, "upscaled": 0, "remote_retries": 0,
            "shards": {}, "examples": []}


class DataStats:
    """``stats`` dict layout::

        {"samples": good samples delivered, "bad": skipped samples,
         "bad_by_reason": {reason: n}, "converted": {original PIL mode: n}, "upscaled": n,
         "remote_retries": reconnects after a dropped connection to an http(s) shard,
         "shards": {shard: {"samples": good, "bad": n, "reasons": {reason: n}}},
         "examples": [{"shard", "key", "reason", "detail"}, ...]  (first few bad samples)}
    """

    def __init__(self, data: dict[str, Any] | None = None):
        self.data = copy.deepcopy(data) if data else _empty()

    def _shard(self, shard: str) -> dict[str, Any]:
        return self.data["shards"].setdefault(shard, {"samples": 0, "bad": 0, "reasons": {}})

    def add_good(self, shard: str, n: int = 1) -> None:
        self.data["samples"] += n
        self._shard(shard)["samples"] += n

    def add_bad(self, shard: str, reason: str, n: int = 1, key: str = "", detail: str = "") -> None:
        d = self.data
        d["bad"] += n
        d["bad_by_reason"][reason] = d["bad_by_reason"].get(reason, 0) + n
        s = self._shard(shard)
        s["bad"] += n
        s["reasons"][reason] = s["reasons"].get(reason, 0) + n
        if len(d["examples"]) < MAX_EXAMPLES:
            d["examples"].append({"shard": shard, "key": key, "reason": reason, "detail": detail[:200]})

    def add_converted(self, mode: str) -> None:
        self.data["converted"][mode] = self.data["converted"].get(mode, 0) + 1

    def add_upscaled(self) -> None:
        self.data["upscaled"] += 1

    def add_retry(self) -> None:
        self.data["remote_retries"] = self.data.get("remote_retries", 0) + 1

    def pop_delta(self) -> dict[str, Any]:
        """Return the counts so far and start again from zero (worker side)."""
        out, self.data = self.data, _empty()
        return out

    def merge(self, delta: dict[str, Any]) -> None:
        d = self.data
        for k in ("samples", "bad", "upscaled", "remote_retries"):
            d[k] = d.get(k, 0) + delta.get(k, 0)
        for k in ("bad_by_reason", "converted"):
            d[k] = dict(Counter(d[k]) + Counter(delta.get(k, {})))
        for shard, s in delta.get("shards", {}).items():
            t = self._shard(shard)
            t["samples"] += s["samples"]
            t["bad"] += s["bad"]
            t["reasons"] = dict(Counter(t["reasons"]) + Counter(s["reasons"]))
        room = MAX_EXAMPLES - len(d["examples"])
        if room > 0:
            d["examples"].extend(delta.get("examples", [])[:room])

    @property
    def total(self) -> int:
        return self.data["samples"] + self.data["bad"]

    @property
    def bad_fraction(self) -> float:
        return self.data["bad"] / self.total if self.total else 0.0

    def worst_shards(self, n: int = 3) -> list[tuple[str, dict[str, Any]]]:
        bad = [(k, v) for k, v in self.data["shards"].items() if v["bad"]]
        return sorted(bad, key=lambda kv: (-kv[1]["bad"], kv[0]))[:n]

    def check(self, max_bad_fraction: float, min_samples: int = 0) -> None:
        """Raise DataQualityError if more than ``max_bad_fraction`` of the samples seen were bad."""
        if self.total < max(min_samples, 1) or self.bad_fraction <= max_bad_fraction:
            return
        worst = "; ".join(
            f"{Path(k).name} ({v['bad']} bad, {v['samples']} good: "
            + ", ".join(f"{r}={c}" for r, c in sorted(v["reasons"].items())) + ")"
            for k, v in self.worst_shards())
        ex = self.data["examples"][0] if self.data["examples"] else None
        example = (f" First bad sample: {ex['key'] or '?'} in {ex['shard']}: {ex['reason']} {ex['detail']}."
                   if ex else "")
        raise DataQualityError(
            f"{self.data['bad']} of {self.total} samples ({self.bad_fraction:.1%}) were bad, above "
            f"max_bad_fraction={max_bad_fraction:g}. By reason: {self.data['bad_by_reason']}. "
            f"Worst shards: {worst}.{example} Check the shards with "
            f"`beit shards verify --dir <shard folder>`, rewrite or drop the bad ones, or raise "
            f"max_bad_fraction if this much loss is acceptable.")

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        """Flat numbers for logging (sum them across ranks before logging)."""
        out = {f"{prefix}samples": self.data["samples"], f"{prefix}bad": self.data["bad"],
               f"{prefix}upscaled": self.data["upscaled"]}
        if self.data.get("remote_retries"):
            out[f"{prefix}remote_retries"] = self.data["remote_retries"]
        for r, c in self.data["bad_by_reason"].items():
            out[f"{prefix}bad_{r}"] = c
        for m, c in self.data["converted"].items():
            out[f"{prefix}converted_{m}"] = c
        return out


def describe_reads(metrics: dict[str, float], image_size: int, prefix: str = "data/") -> str | None:
    """One end-of-run line on what reading changed in the images (from summed loader ``metrics``): how many
    were smaller than the input and upscaled, how many were converted to RGB from which mode; None if nothing."""
    samples = int(metrics.get(f"{prefix}samples", 0))
    upscaled = int(metrics.get(f"{prefix}upscaled", 0))
    modes = {k[len(prefix) + len("converted_"):]: int(v) for k, v in sorted(metrics.items())
             if k.startswith(f"{prefix}converted_") and v}
    if not samples or not (upscaled or modes):
        return None
    parts = []
    if upscaled:
        parts.append(f"{upscaled} ({upscaled / samples:.0%}) smaller than {image_size} px on a side, upscaled")
    if modes:
        parts.append(f"{sum(modes.values())} converted to RGB (" + ", ".join(f"{n} from {m}" for m, n in modes.items())
                     + ")")
    return f"data: of {samples} samples read, " + "; ".join(parts)
