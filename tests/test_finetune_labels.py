"""Labels come from the data: the class count and names from the training shards' label map; a
recipe or flag that disagrees, or held-out shards with another label map, are refused at start-up."""

import pytest
from data_testutil import jpeg

from beit.data.pipelines.labelled import class_names_of, resolve_classes
from beit.data.storage.shard_writer import Item, WriteOptions, write_shards


def labelled(root, label_map, n=6):
    names = sorted(label_map, key=label_map.get)
    items = [Item(key=f"k{i}", image=jpeg(i), ext="jpg", label=label_map[names[i % len(names)]]) for i in range(n)]
    write_shards(items, root, prefix="train", opts=WriteOptions(max_samples=3, validate="none"), label_map=label_map,
                 source="test", overwrite=True, progress=False)
    return str(root / "train-*.tar")


def test_class_count_and_names_from_the_manifest(tmp_path):
    spec = labelled(tmp_path / "a", {"cat": 0, "dog": 1, "owl": 2})
    assert resolve_classes(spec, "", 0) == (3, ["cat", "dog", "owl"])
    assert resolve_classes(spec, spec, 3) == (3, ["cat", "dog", "owl"])  # agreeing count is fine
    assert class_names_of({"a": 0, "c": 2}) == ["a", "1", "c"]


def test_a_disagreeing_count_is_refused_with_both_numbers(tmp_path):
    spec = labelled(tmp_path / "a", {"cat": 0, "dog": 1, "owl": 2})
    with pytest.raises(ValueError, match=r"--num_classes 1000 .* disagrees with the 3 classes .*cat, dog, owl"):
        resolve_classes(spec, "", 1000)


def test_held_out_shards_with_another_label_map_are_refused(tmp_path):
    train = labelled(tmp_path / "a", {"cat": 0, "dog": 1, "owl": 2})
    val = labelled(tmp_path / "b", {"cat": 0, "owl": 1})
    with pytest.raises(ValueError, match="held-out shards' label map .*2 classes.* differs .*3 classes"):
        resolve_classes(train, val, 0)


def test_unlabelled_shards_need_num_classes(tmp_path):
    items = [Item(key=f"k{i}", image=jpeg(i), ext="jpg") for i in range(3)]
    write_shards(items, tmp_path, prefix="train", opts=WriteOptions(validate="none"), progress=False)
    with pytest.raises(ValueError, match="no label_map .*--layout imagenet.*--num_classes"):
        resolve_classes(str(tmp_path / "train-*.tar"), "", 0)
    assert resolve_classes(str(tmp_path / "train-*.tar"), "", 150) == (150, None)  # e.g. ADE20K


def test_recipes_take_the_class_count_from_the_data():
    import yaml

    from beit.config import resolve_recipe
    for name in ("beit_base_in1k", "beit_large_in1k"):
        recipe = yaml.safe_load(resolve_recipe(name, "finetune_").read_text())
        assert recipe["num_classes"] == 0, name
