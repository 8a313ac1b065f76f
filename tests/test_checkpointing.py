import json

import pytest
import torch

from beit.checkpoints.checkpointing import (
    COMPLETE,
    check_resume_compatible,
    checkpoint_path,
    config_fingerprint,
    find_latest_complete,
    list_complete,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
)


def _setup(acc, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    return model, opt


def _train_step(model, opt):
    loss = model(torch.randn(8, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_save_load_restores_model_optimizer_rng_and_json_state(acc, tmp_path):
    model, opt = _setup(acc)
    _train_step(model, opt)
    path = save_checkpoint(acc, tmp_path, 5, {"epoch": 2, "sched": {"next_step": 5}}, {"pos": 7})
    assert path == checkpoint_path(tmp_path, 5) and (path / COMPLETE).is_file()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected_rand = torch.rand(3)
    _train_step(model, opt)                                    # move away from the saved state
    torch.rand(10)
    state, rank_state = load_checkpoint(acc, path)
    assert state["epoch"] == 2 and state["step"] == 5 and state["sched"] == {"next_step": 5}
    assert rank_state == {"pos": 7}
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert torch.equal(torch.rand(3), expected_rand)           # RNG restored
    assert opt.state_dict()["state"][0]["step"].item() == 1


def test_incomplete_folders_are_ignored_and_keep_last(acc, tmp_path):
    model, opt = _setup(acc)
    for step in (10, 20, 30, 40):
        save_checkpoint(acc, tmp_path, step, {"epoch": 0}, keep_last=2)
    assert [s for s, _ in list_complete(tmp_path)] == [30, 40]
    # a crashed save: temp folder with everything but the marker, and a final-named folder without it
    tmp = tmp_path / "checkpoints" / ".tmp_step_0000050"
    tmp.mkdir()
    (tmp / "train_state.json").write_text("{}")
    (tmp_path / "checkpoints" / "step_0000060").mkdir()
    assert find_latest_complete(tmp_path) == checkpoint_path(tmp_path, 40)
    assert find_latest_complete(tmp_path / "nothing_here") is None


class _TwoRanks:
    """The real accelerator, claiming a second rank that never writes its part."""

    def __init__(self, acc):
        self._acc = acc

    def __getattr__(self, name):
        return getattr(self._acc, name)

    num_processes = 2


def test_checkpoint_not_marked_complete_when_a_rank_part_is_missing(acc, tmp_path):
    _setup(acc)
    with pytest.raises(RuntimeError, match=r"ranks \[1\] did not write"):
        save_checkpoint(_TwoRanks(acc), tmp_path, 7, {"epoch": 0})
    assert find_latest_complete(tmp_path) is None


def test_different_world_size_restarts_data_position(acc, tmp_path):
    _setup(acc)
    path = save_checkpoint(acc, tmp_path, 3, {"epoch": 1}, {"pos": 2})
    state = json.loads((path / "train_state.json").read_text())
    (path / "train_state.json").write_text(json.dumps(dict(state, world_size=2)))
    with pytest.warns(UserWarning, match="restarts epoch 1"):
        _, rank_state = load_checkpoint(acc, path)
    assert rank_state is None


def test_resume_compatibility_names_changed_fields():
    saved = {"embed_dim": 64, "tokenizer_path": "a.safetensors", "lr": 1e-3}
    now = {"embed_dim": 96, "tokenizer_path": "a.safetensors", "lr": 5e-4}
    keys = ["embed_dim", "tokenizer_path"]
    with pytest.raises(ValueError, match=r"embed_dim: saved 64, now 96"):
        check_resume_compatible(saved, now, keys)
    check_resume_compatible(saved, dict(now, embed_dim=64), keys)   # lr may change
    assert config_fingerprint(saved, keys) != config_fingerprint(now, keys)
    assert config_fingerprint(saved, keys) == config_fingerprint(dict(now, embed_dim=64), keys)


def test_weights_round_trip(tmp_path):
    sd = {"cls_token": torch.randn(1, 1, 4), "lm_head.weight": torch.randn(8, 4)}
    p = save_weights(sd, tmp_path / "pretrained.safetensors", {"embed_dim": 4})
    loaded, cfg = load_weights(p)
    assert cfg == {"embed_dim": 4} and set(loaded) == set(sd)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
