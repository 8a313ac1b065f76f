"""BEiT v2 pretraining checkpoints against unilm's own code, both ways, with the CLS-pretraining branch kept.

Fixtures (tests/fixtures/make_reference_fixtures.py): ``unilm_v2_cls_pt`` is beit2's model as
run_beitv2_pretraining builds it with its defaults (early_layers 9 of the base model's 12 blocks, head_layers 2,
shared LM head), ``unilm_v2_cls_pt_own_head`` the same with ``--shared_lm_head false``, both saved by unilm's
``utils.save_model``; ``ours_beitv2_in_unilm`` is a run of our ``beit pretrain --cls_pretraining`` exported with
``beit export --format unilm`` and loaded strictly by unilm's class, whose outputs the generator checked against
ours. Each holds unilm's logits of both branches and its engine's two losses for an even and a ragged mask.
"""
import pytest
import torch
from reference_fixtures import case, checkpoint, max_abs_diff

from beit.checkpoints.mim_loading import load_pretrain_model
from beit.engines.pretrain import mim_losses

CASES = ["unilm_v2_cls_pt", "unilm_v2_cls_pt_own_head", "ours_beitv2_in_unilm"]
TOL = 2e-5


@pytest.mark.parametrize("name", CASES)
def test_unilm_v2_checkpoints_give_unilms_logits_and_losses(name):
    d, meta, io = case(name)
    model, report = load_pretrain_model(checkpoint(name))
    assert model.branches == ("mim", "cls_pt") and report.dropped == ["rel_pos_bias.relative_position_index"]
    if name.startswith("unilm"):  # read off the file: its args (early_layers), its keys (head, shared head)
        cfg = model.config
        assert (cfg["depth"], cfg["early_layers"], cfg["head_layers"]) == (meta["depth"], 9, 2)
        assert cfg["shared_lm_head"] == meta["shared_lm_head"] == (name == "unilm_v2_cls_pt")
        assert hasattr(model, "cls_pt_lm_head") != cfg["shared_lm_head"]
    for key in ("mask", "mask_ragged"):  # the ragged mask takes the full-sequence path, the even one the fast path
        labels = io[f"{key}.labels"]
        with torch.no_grad():
            outputs = model(io["images"], io[key])
            total, per = mim_losses(outputs, labels)
        for branch in ("mim", "cls_pt"):
            assert max_abs_diff(outputs[branch], io[f"{key}.logits_{branch}"]) < TOL, (key, branch)
            assert float(per[branch][0]) == pytest.approx(float(io[f"{key}.loss_{branch}"]), abs=1e-5)
        assert float(total) == pytest.approx(float(io[f"{key}.loss_mim"] + io[f"{key}.loss_cls_pt"]), abs=1e-5)
        # the branch really differs from the main prediction (a copy of it would pass the loss check too)
        assert max_abs_diff(outputs["mim"], outputs["cls_pt"]) > 1e-2


def test_the_branch_reads_the_early_block_and_the_last_cls_token():
    """Perturbing block early_layers + 1 onwards moves the CLS branch only through the last CLS token: with the CLS
    token pinned the branch depends on the blocks up to early_layers only."""
    d, meta, io = case("unilm_v2_cls_pt")
    model, _ = load_pretrain_model(checkpoint("unilm_v2_cls_pt"))
    x, mask = io["images"], io["mask_ragged"]  # the full-sequence path: the last block is called (hooks fire)
    with torch.no_grad():
        ref = model(x, mask)
        cls_out = {}
        keep = model.blocks[-1].register_forward_hook(lambda m, i, o: cls_out.__setitem__("cls", o[:, :1].clone()))
        model(x, mask)
        keep.remove()
        pin = model.blocks[-1].register_forward_hook(
            lambda m, i, o: torch.cat((cls_out["cls"], o[:, 1:]), 1))
        for blk in model.blocks[model.early_layers:-1]:  # later blocks changed: the main branch moves, the CLS
            blk.mlp.fc2.weight.mul_(3.0)                    # branch (its CLS token pinned) does not
        out = model(x, mask)
        pin.remove()
    assert max_abs_diff(out["mim"], ref["mim"]) > 1e-2
    assert max_abs_diff(out["cls_pt"], ref["cls_pt"]) < 1e-5


def test_our_unilm_export_keeps_unilms_exact_layout(tmp_path):
    """Today's writer gives the keys and shapes unilm's class took strictly in the generator (the fixture's
    record), and the file reads back weights-only into our model with the same outputs."""
    from beit.export.unilm import write_unilm
    from beit.modeling.mim import BeitPretrainModel
    d, meta, io = case("ours_beitv2_in_unilm")
    model, _ = load_pretrain_model(checkpoint("ours_beitv2_in_unilm"))
    out = write_unilm(BeitPretrainModel(**model.config), tmp_path / "x.pth")
    sd = torch.load(out, map_location="cpu", weights_only=True)["model"]
    assert {k: list(v.shape) for k, v in sd.items()} == meta["unilm_state_dict"]
    out = write_unilm(model, tmp_path / "again.pth")
    again, _ = load_pretrain_model(out)
    with torch.no_grad():
        a, b = model(io["images"], io["mask"]), again(io["images"], io["mask"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fine_tuning_from_a_v2_checkpoint_drops_the_branch_with_a_note():
    from test_reference_checkpoints import init_model
    d, meta, io = case("unilm_v2_cls_pt_own_head")
    model, log = init_model(checkpoint("unilm_v2_cls_pt_own_head"))
    assert "BEiT v2's CLS-pretraining branch (2 head block(s), its own norm and LM head)" in log
    assert "dropped (unilm's fine-tuning leaves it unused too)" in log
    with torch.no_grad():
        assert max_abs_diff(model.forward_features(io["images"]), io["features"]) < 1e-4


def test_early_layers_not_recorded_is_assumed_with_a_note_and_a_wrong_one_is_refused(tmp_path):
    sd = torch.load(checkpoint("unilm_v2_cls_pt"), map_location="cpu", weights_only=False)["model"]
    torch.save({"model": sd}, tmp_path / "released.pth")   # the released files: weights only, no args
    model, report = load_pretrain_model(tmp_path / "released.pth")
    assert model.early_layers == 9 and "early_layers is not recorded" in report.summary()
    with pytest.raises(ValueError, match="pretrained with early_layers 9"):
        load_pretrain_model(checkpoint("unilm_v2_cls_pt"), early_layers=5)
    model, report = load_pretrain_model(tmp_path / "released.pth", early_layers=5)
    assert model.early_layers == 5 and not report.notes


def test_what_does_not_load_says_why(tmp_path):
    with pytest.raises(ValueError, match="no mask_token / lm_head: not a pretraining checkpoint"):
        load_pretrain_model(checkpoint("unilm_v1_finetuned_block_relpos"))
    with pytest.raises(ValueError, match="shared relative position bias only"):
        load_pretrain_model(checkpoint("unilm_v1_abs_layerscale"))
    sd = torch.load(checkpoint("unilm_v2_cls_pt"), map_location="cpu", weights_only=False)["model"]
    sd["rel_pos_bias.relative_position_index"] = sd["rel_pos_bias.relative_position_index"].flip(0)
    torch.save({"model": sd}, tmp_path / "bad_index.pth")
    with pytest.raises(ValueError, match="relative_position_index is not the one of a 4x4 patch grid"):
        load_pretrain_model(tmp_path / "bad_index.pth")
