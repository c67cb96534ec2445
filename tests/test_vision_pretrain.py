"""Tag-pretraining the vision tower (the demo's stand-in for CLIP): it learns, only the tower moves, and it
is deterministic for one seed."""

from __future__ import annotations

import json

import pytest

from hallu import tiny
from hallu.data import shapes
from hallu.errors import HalluError
from hallu.vision_pretrain import pretrain_vision_tower


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    shapes.build_world(root / "world", n_images=60, seed=0)
    tiny.build_tiny_model("llava", root / "init", seed=0)
    inst = json.loads((root / "world" / "annotations" / "instances_train2014.json").read_text())
    index = {c.id: i for i, c in enumerate(shapes.CATEGORIES)}
    files = {im["id"]: im["file_name"] for im in inst["images"]}
    labels = {i: set() for i in files}
    for a in inst["annotations"]:
        labels[a["image_id"]].add(index[a["category_id"]])
    ids = sorted(files)
    images = [root / "world" / "images" / files[i] for i in ids]
    return root, images, [sorted(labels[i]) for i in ids]


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_only_the_tower_learns_and_one_seed_gives_the_same_weights(setup):
    root, images, labels = setup
    losses: list[float] = []
    summary = pretrain_vision_tower(root / "init", root / "a", images, labels, steps=40, batch_size=16,
                                    learning_rate=3e-3, warmup=5, seed=1,
                                    progress=lambda step, loss: losses.append(loss))
    assert summary["steps"] == 40 and summary["images"] == len(images) and summary["categories"] <= 24
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first  # the tags are being learned
    init, a = _weights(root / "init"), _weights(root / "a")
    moved = {k for k in init if not (init[k] == a[k]).all()}
    assert moved and all("vision_tower" in k for k in moved)  # projector and language model untouched
    assert (root / "a" / "tokenizer.json").exists()  # the folder is a whole, loadable model
    pretrain_vision_tower(root / "init", root / "b", images, labels, steps=40, batch_size=16, learning_rate=3e-3,
                          warmup=5, seed=1)
    assert (root / "a" / "model.safetensors").read_bytes() == (root / "b" / "model.safetensors").read_bytes()


def test_mismatched_labels_are_refused(setup):
    root, images, labels = setup
    with pytest.raises(HalluError, match="label sets"):
        pretrain_vision_tower(root / "init", root / "c", images, labels[:-1], steps=1)


def test_freezing_the_tower_leaves_the_projector_and_language_model_training(setup):
    from transformers import AutoModelForImageTextToText

    from hallu.train import common, dpo

    root, _, _ = setup
    model = AutoModelForImageTextToText.from_pretrained(root / "init")
    n = common.freeze_vision_tower(model)
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    assert n == len(frozen) > 0 and all("vision_tower" in k for k in frozen)
    assert any("multi_modal_projector" in k for k, p in model.named_parameters() if p.requires_grad)
    # the DPO freeze (language-model-only methods) takes the projector as well
    model = AutoModelForImageTextToText.from_pretrained(root / "init")
    assert dpo.freeze_vision(model) > n
    assert not any(p.requires_grad for k, p in model.named_parameters() if "multi_modal_projector" in k)
