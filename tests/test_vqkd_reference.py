"""A VQ-KD trained by us is written in unilm's layout: unilm's own ``VQKD`` loads the file strictly and its
tokens are ours (fixture ``ours_vqkd_in_unilm``, made by tests/fixtures/make_reference_fixtures.py running
unilm's code on a file our trainer wrote), and today's trainer still writes exactly that layout."""
import pytest
import torch
from reference_fixtures import case
from vqkd_testutil import run_vqkd, timm_teacher, tiny_vqkd

from beit.tokenizers import load_tokenizer


def test_unilms_tokens_on_our_trained_file_equal_ours():
    d, meta, io = case("ours_vqkd_in_unilm")
    ref = io["tokens"]
    tok = load_tokenizer("vqkd", d / meta["checkpoint"])  # the head count from the JSON written beside it
    assert tok.get_config()["num_heads"] == 4 and tok.process_type == "default"
    equal = (tok.tokenize(io["images"]).flatten(1) == ref).float().mean().item()
    assert ref.numel() >= 2000 and len(ref.unique()) > 32
    assert equal >= 0.999, f"{equal:.4%} of {ref.numel()} tokens equal unilm's"


@pytest.mark.usefixtures("one_thread")
def test_the_trainer_still_writes_what_unilm_loads(tmp_path):
    """A run of the fixture's architecture writes exactly the keys and shapes unilm's VQKD has."""
    from beit.data.sample_sets import build_sample_shards
    _, meta, _ = case("ours_vqkd_in_unilm")
    build_sample_shards(tmp_path / "photos", "photos")
    photos = tmp_path / "photos"
    shards = {"train": str(photos / "train-000000.tar"), "val": str(photos / "val-000000.tar")}
    cfg = tiny_vqkd(shards, timm_teacher(tmp_path / "teacher"), tmp_path / "run", depth=2, num_heads=4,
                    decoder_num_heads=4, total_steps=2, eval_every=2, checkpoint_every=2)
    run_vqkd(cfg)
    written = torch.load(tmp_path / "run" / "vqkd_unilm.pth", weights_only=True)["model"]
    assert {k: list(v.shape) for k, v in written.items()} == meta["unilm_state_dict"]
