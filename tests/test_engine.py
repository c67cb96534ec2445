"""The engine against the one-question-at-a-time path it replaces, on tiny models of several families."""

import random

import pytest
import torch
from PIL import Image

from hallu import tiny
from hallu.data.shapes import tokenizer_corpus
from hallu.engine import Decoding, Engine, GenRequest
from hallu.models import load_model
from hallu.records import user_messages

OBJECTS = ["dog", "cat", "fork", "knife", "spoon", "bowl", "person", "car", "pizza", "cup"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-models")
    out = {}
    for family in ("llava", "llava-next", "idefics3", "qwen2-vl", "instructblip"):
        tiny.build_tiny_model(family, root / family, corpus=tokenizer_corpus(), seed=1)
        out[family] = load_model(root / family)
    return out


def _requests(n_images=4, per_image=3, seed=0, size=(64, 48)):
    rng = random.Random(seed)
    reqs = []
    for i in range(n_images):
        img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        for j in range(per_image):
            q = f"Is there a {rng.choice(OBJECTS)} in the image?" if j else "Describe this image in detail."
            reqs.append(GenRequest(f"{i}-{j}", [img], q, image_key=(i,)))
    return reqs


def _one_at_a_time(lm, request, max_new_tokens):
    prompt = lm.processor.apply_chat_template(user_messages(request.text, 1), add_generation_prompt=True,
                                              tokenize=False)
    enc = lm.processor(images=list(request.images), text=[prompt], return_tensors="pt")
    with torch.inference_mode():
        out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return lm.processor.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


@pytest.mark.parametrize("family, shares_prefix", [
    ("llava", True), ("llava-next", True),
    # Plain batched path: Idefics3's processor gives no replacement strings, Qwen2-VL positions are M-RoPE,
    # InstructBLIP's image features depend on the question.
    ("idefics3", False), ("qwen2-vl", False), ("instructblip", False),
])
def test_generate_equals_one_at_a_time(models, family, shares_prefix):
    lm = models[family]
    reqs = _requests()
    engine = Engine(lm.model, lm.processor, batch_size=5)  # groups straddle batches on purpose
    got = {g.id: g.text for batch in engine.generate(reqs, Decoding(max_new_tokens=10)) for g in batch}
    assert engine.share_prefix is shares_prefix
    if shares_prefix:
        assert engine._verified, "the expanded token ids were checked against the processor's"
    expected = {r.id: _one_at_a_time(lm, r, 10) for r in reqs}
    assert got == expected
    assert any(t for t in got.values()), "random weights still produce text"


def test_generation_records_length_and_eos(models):
    lm = models["llava"]
    gens = [g for b in Engine(lm.model, lm.processor).generate(_requests(2, 2), Decoding(max_new_tokens=3))
            for g in b]
    assert [(g.id, g.sample) for g in gens] == [("0-0", 0), ("0-1", 0), ("1-0", 0), ("1-1", 0)]
    assert all(g.tokens <= 3 and (g.finished or g.tokens == 3) for g in gens)


@pytest.mark.parametrize("family", ["llava", "llava-next", "idefics3"])
def test_choice_scores_equal_a_full_forward(models, family):
    lm = models[family]
    reqs = _requests(3, 3, seed=2)
    engine = Engine(lm.model, lm.processor, batch_size=4)
    yes, no = engine.choice_token_ids(("Yes", "No"))
    assert lm.processor.tokenizer.decode([yes]).strip() == "Yes"
    choices = {c.id: c for b in engine.choose(reqs) for c in b}
    for r in reqs:
        prompt = engine.render(r)
        enc = lm.processor(images=list(r.images), text=[prompt], return_tensors="pt")
        with torch.inference_mode():
            logits = lm.model(**enc).logits[0, -1].float()
        c = choices[r.id]
        assert c.scores["Yes"] == pytest.approx(float(logits[yes]), abs=1e-4)
        assert c.scores["No"] == pytest.approx(float(logits[no]), abs=1e-4)
        assert c.pred == ("Yes" if logits[yes] > logits[no] else "No")


def test_sampling_is_reproducible_per_seed(models):
    lm = models["llava"]
    reqs = _requests(2, 1)
    engine = Engine(lm.model, lm.processor)

    def sample(seed):
        d = Decoding(max_new_tokens=8, do_sample=True, temperature=1.0, n=3, seed=seed)
        return [(g.id, g.sample, g.text) for b in engine.generate(reqs, d) for g in b]

    a, b, c = sample(5), sample(5), sample(6)
    assert a == b and a != c
    assert [(i, s) for i, s, _ in a] == [("0-0", 0), ("0-0", 1), ("0-0", 2), ("1-0", 0), ("1-0", 1), ("1-0", 2)]
    assert len({t for _, _, t in a}) > 1, "n samples of one prompt differ"


def test_multi_image_requests_share_nothing_they_should_not(models):
    lm = models["llava"]
    rng = random.Random(3)
    a, b = (Image.new("RGB", (40, 40), tuple(rng.randrange(256) for _ in range(3))) for _ in range(2))
    reqs = [GenRequest("ab", [a, b], "<image> left and <image> right: same?", image_key=("a", "b")),
            GenRequest("ab2", [a, b], "<image> left and <image> right: which is red?", image_key=("a", "b")),
            GenRequest("ba", [b, a], "<image> left and <image> right: same?", image_key=("b", "a"))]
    got = {g.id: g.text for batch in Engine(lm.model, lm.processor).generate(reqs, Decoding(max_new_tokens=6))
           for g in batch}
    for r in reqs:
        prompt = lm.processor.apply_chat_template(user_messages(r.text, 2), add_generation_prompt=True,
                                                  tokenize=False)
        enc = lm.processor(images=list(r.images), text=[prompt], return_tensors="pt")
        out = lm.model.generate(**enc, max_new_tokens=6, do_sample=False)
        assert got[r.id] == lm.processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:],
                                                          skip_special_tokens=True).strip()


def test_images_load_from_paths_with_a_clear_error(models, tmp_path):
    from hallu.errors import HalluError

    lm = models["llava"]
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "red.png")
    engine = Engine(lm.model, lm.processor, image_base=tmp_path)
    gens = [g for b in engine.generate([GenRequest("r", ["red.png"], "Describe.")], Decoding(max_new_tokens=2))
            for g in b]
    assert gens[0].id == "r"
    with pytest.raises(HalluError, match=r"request x: image .*missing\.png not found"):
        list(engine.generate([GenRequest("x", ["missing.png"], "Describe.")], Decoding(max_new_tokens=2)))
