"""The fitted scratch rule of ``beit compare``: the loss floor, the degenerate comparison, the ladder's budget and the
under-fitted mark, each with real (tiny) fine-tunes on the bundled digits."""
import math

import pytest

from beit.compare import fitted
from beit.compare.labels import read_labelled, stratified_subset, write_labelled
from beit.compare.options import CompareConfig
from beit.compare.recipe import FINETUNE, SCRATCH

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

def test_loss_floor_is_the_entropy_of_the_smoothed_targets():
    assert fitted.loss_floor(2, 0.1) == pytest.approx(0.1985, abs=1e-4)  # the 2-class floor
    assert fitted.loss_floor(10, 0.1) == pytest.approx(-(0.91 * math.log(0.91) + 9 * 0.01 * math.log(0.01)))
    assert fitted.loss_floor(10, 0.0) == 0.0
    # the floor is reached by the smoothed targets' own distribution and by nothing lower
    import torch
    logits = torch.log(torch.tensor([[0.95, 0.05]]))
    assert float(torch.nn.functional.cross_entropy(logits, torch.tensor([0]), label_smoothing=0.1)) == \
        pytest.approx(fitted.loss_floor(2, 0.1), abs=1e-6)


def test_a_loss_within_noise_of_the_floor_is_a_degenerate_comparison():
    smooth = {"label_smoothing": 0.1}
    tail = [0.1993, 0.1991, 0.1994, 0.1992, 0.19928]
    why = fitted.degenerate_loss(0.19928, tail, 2, smooth)  # the 2-class case: 0.19928 vs 0.19942
    assert "floor 0.1985" in why and "2 classes" in why
    assert fitted.degenerate_loss(0.538, [0.54, 0.535, 0.538], 10, smooth) == ""  # 4,000 digits: a real gap
    assert fitted.degenerate_loss(0.52, [0.40, 0.60, 0.45, 0.58], 10, smooth) != ""  # gap below the loss's spread
    assert fitted.degenerate_loss(0.1986, tail, 2, {**smooth, "mixup": 0.8}) == ""  # soft targets: no floor known


def test_the_ladder_doubles_up_to_the_budget():
    cfg = CompareConfig(scratch_epoch_factors=[2.0, 1.0])
    assert fitted.ladder(cfg) == [1.0, 2.0]
    cfg.scratch_max_factor = 5.0
    assert fitted.ladder(cfg) == [1.0, 2.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="scratch_max_factor"):
        CompareConfig(train_shards="a", test_shards="b", scratch_max_factor=-1).validate()


def tiny_run(digits, tmp_path, classes, **cfg_kw):
    """(cfg, label subset, its shard pattern, test pattern, the scratch recipe) for tiny fine-tunes on ``classes``
    of the digits."""
    samples = [s for s in read_labelled(str(digits / "train-*.tar"), "train_shards") if s["label"] in classes]
    subset, _ = stratified_subset(samples, 0.2, 0)
    pattern = write_labelled(subset, tmp_path / "labels", "train", {}, "test", 0)
    held = [s for s in read_labelled(str(digits / "test-*.tar"), "test_shards") if s["label"] in classes]
    test = write_labelled(held, tmp_path / "test", "test", {}, "test", 0)
    cfg = CompareConfig(train_shards=pattern, test_shards=test, output_dir=str(tmp_path),
                        embed_dim=32, depth=1, num_heads=2, scratch_epoch_factors=[1.0, 2.0], **cfg_kw)
    base = {**FINETUNE, **SCRATCH, "epochs": 1, "warmup_epochs": 0}
    return cfg, subset, pattern, test, base


def test_no_length_reaches_beits_loss_the_ladder_goes_on_then_marks_the_row(digits, tmp_path):
    """A BEiT loss below any scratch run's (0.55 with 10 classes: just above the 0.500 floor; a 1-block ViT at
    1-3 epochs is far above it): every length up to the budget is run, the longest kept, the row marked."""
    cfg, subset, pattern, test, base = tiny_run(digits, tmp_path, range(10), scratch_max_factor=3.0)
    rec = fitted.fit_scratch(cfg, tmp_path / "seed0", 0, pattern, test, subset, {}, base, None,
                             {"train_loss": 0.55, "train_loss_tail": [0.55, 0.551, 0.549]})
    assert [t["epochs"] for t in rec["tried"]] == [1, 2, 3] and rec["epochs"] == rec["chosen_epochs"] == 3
    assert all(t["train_loss"] > 0.55 for t in rec["tried"])
    assert rec["decision"] == "under_fitted" and rec["decision_note"].startswith("under-fitted at 3 epochs")
    assert fitted.row_mark([rec, {**rec, "decision": "reached"}], [0, 1]) == "under-fitted at 3 epochs on seed 0"
    # a BEiT loss the first length reaches: the ladder stops there
    easy = fitted.fit_scratch(cfg, tmp_path / "seed0", 0, pattern, test, subset, {}, base, None,
                              {"train_loss": 5.0, "train_loss_tail": [5.0]})
    assert easy["decision"] == "reached" and [t["epochs"] for t in easy["tried"]] == [1]


def test_a_degenerate_loss_comparison_chooses_on_the_validation_split(digits, tmp_path):
    """2 classes, label smoothing 0.1: BEiT's loss 0.1990 is within noise of the 0.1985 floor, so the lengths are
    scored on a validation split carved from the label subset, and compare.md's notes say so."""
    from beit.compare.run import _notes
    cfg, subset, pattern, test, base = tiny_run(digits, tmp_path, (0, 1))
    rec = fitted.fit_scratch(cfg, tmp_path / "seed0", 0, pattern, test, subset, {}, base, None,
                             {"train_loss": 0.1990, "train_loss_tail": [0.1991, 0.1989, 0.1990]})
    assert rec["decision"] == "val" and all("val_top1" in t for t in rec["tried"])
    assert "floor 0.1985 of 2 classes" in rec["decision_note"]
    assert (tmp_path / "seed0" / "scratch_fit" / "labels").is_dir() and rec["epochs"] == rec["chosen_epochs"]
    notes = _notes(cfg, [{"seed": 0, "scratch_fitted": rec}, {"seed": 3, "scratch_fitted": {
        **rec, "decision": "under_fitted", "decision_note": "under-fitted at 2 epochs: ..."}}], pattern, 1.0)
    assert "What the rule did: seed 0: chosen on " in notes and "seed 3: under-fitted at 2 epochs" in notes
