"""Engine.score and Engine.attention against a plain full forward of the whole conversation; no deprecations."""

import logging
import math
import random
import warnings

import pytest
import torch
from PIL import Image

from hallu import tiny
from hallu.engine import Decoding, Engine, GenRequest, ScoreRequest
from hallu.errors import HalluError
from hallu.models import load_model
from hallu.records import assistant_message, user_messages


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("score-models")
    out = {}
    for family in ("llava", "qwen2-vl", "instructblip"):
        tiny.build_tiny_model(family, root / family, seed=3)
        out[family] = load_model(root / family)
    return out


def _image(rng, size=(56, 40)):
    return Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))


def _requests(multi_image: bool, seed=0):
    """Three images, two questions each, 1-3 completions of different lengths (two share a first word)."""
    rng = random.Random(seed)
    answers = ["A dog.", "A cat sits on a red mat near the door.", "No", "Yes, there is one.", "Two forks"]
    reqs = []
    for i in range(3):
        img = _image(rng)
        for j, q in enumerate(("Describe the image.", "Is there a fork?")):
            k = 1 + (i + j) % 3
            reqs.append(ScoreRequest(f"{i}-{j}", [img], q, image_key=(i,), completions=rng.sample(answers, k)))
    if multi_image:
        a, b = _image(rng, (40, 40)), _image(rng, (48, 32))
        reqs.append(ScoreRequest("two", [a, b], "<image> left, <image> right: same?", image_key=("a", "b"),
                                 completions=["No, they differ.", "Yes"]))
    return reqs


def _full_forward(lm, request, completion, **kw):
    """The processor's own rendering of [user, assistant] in one unpadded forward; also the prompt's length."""
    proc = lm.processor
    msgs = user_messages(request.text, len(request.images))
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = proc.apply_chat_template(msgs + [assistant_message(completion)], tokenize=False)
    prompt_enc = proc(images=list(request.images), text=[prompt], return_tensors="pt")
    enc = proc(images=list(request.images), text=[full], return_tensors="pt")
    for key in ("qformer_input_ids", "qformer_attention_mask"):  # InstructBLIP's Q-Former reads the prompt only,
        if key in enc:                                            # as when the model generates the answer
            enc[key] = prompt_enc[key]
    n_prompt = prompt_enc["input_ids"].shape[1]
    with torch.inference_mode():
        out = lm.model(**enc, **kw)
    return enc["input_ids"][0], n_prompt, out


@pytest.mark.parametrize("family, shared", [("llava", True), ("qwen2-vl", False), ("instructblip", False)])
def test_score_equals_a_full_forward(models, family, shared):
    lm = models[family]
    reqs = _requests(multi_image=(family != "instructblip"))  # InstructBLIP takes one image per prompt
    engine = Engine(lm.model, lm.processor, batch_size=4)  # image groups straddle batches on purpose
    scores = [s for batch in engine.score(reqs) for s in batch]
    assert engine.share_prefix is shared
    assert [(s.id, s.completion) for s in scores] == [(r.id, k) for r in reqs for k in range(len(r.completions))]
    eos = lm.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    by_key = {(s.id, s.completion): s for s in scores}
    lengths = set()
    for r in reqs:
        for k, text in enumerate(r.completions):
            s = by_key[(r.id, k)]
            ids, n, out = _full_forward(lm, r, text)
            t = len(s.token_ids)
            lengths.add(t)
            # The scored tokens are the answer's tokens in the full rendering, ending at its end-of-turn token.
            assert s.token_ids == ids[n : n + t].tolist()
            assert s.token_ids[-1] in eos and not eos & set(s.token_ids[:-1])
            assert lm.processor.tokenizer.decode(s.token_ids[:-1]).strip() == text
            expected = out.logits[0, n - 1 : n + t - 1].float().log_softmax(-1)
            expected = expected.gather(-1, ids[n : n + t, None])[:, 0]
            assert s.logprobs == pytest.approx(expected.tolist(), abs=1e-4)
            assert s.sum == pytest.approx(float(expected.sum()), abs=1e-4)
            assert s.mean == pytest.approx(float(expected.mean()), abs=1e-4)
            assert s.perplexity == pytest.approx(math.exp(-float(expected.mean())), rel=1e-4)
    assert len(lengths) >= 3, "completions of different lengths"


def test_score_when_completions_share_their_first_tokens(models):
    # One prompt alone in its group: the common prefix would run into the answers ("A dog ...") if the
    # engine did not stop it at the prompt's last token, whose logits predict every answer's first token.
    lm = models["llava"]
    img = _image(random.Random(5))
    r = ScoreRequest("same-start", [img], "Describe the image.", completions=["A dog runs.", "A dog sits.", "A dog"])
    engine = Engine(lm.model, lm.processor)
    scores = [s for b in engine.score([r]) for s in b]
    assert engine.share_prefix
    assert scores[0].token_ids[:2] == scores[1].token_ids[:2] == scores[2].token_ids[:2]
    for s, text in zip(scores, r.completions, strict=True):
        ids, n, out = _full_forward(lm, r, text)
        expected = out.logits[0, n - 1 : n - 1 + len(s.token_ids)].float().log_softmax(-1)
        expected = expected.gather(-1, ids[n : n + len(s.token_ids), None])[:, 0]
        assert s.logprobs == pytest.approx(expected.tolist(), abs=1e-4)


def test_score_without_the_end_of_turn_token(models):
    lm = models["llava"]
    reqs = _requests(multi_image=False)[:2]
    engine = Engine(lm.model, lm.processor)
    with_eos = [s for b in engine.score(reqs) for s in b]
    without = [s for b in engine.score(reqs, include_eos=False) for s in b]
    for a, b in zip(with_eos, without, strict=True):
        assert b.token_ids == a.token_ids[:-1]
        assert b.logprobs == pytest.approx(a.logprobs[:-1], abs=1e-5)
        assert b.sum == pytest.approx(a.sum - a.logprobs[-1], abs=1e-4)


def test_score_rejects_bad_requests(models):
    lm = models["llava"]
    engine = Engine(lm.model, lm.processor)
    img = Image.new("RGB", (32, 32), (1, 2, 3))
    with pytest.raises(HalluError, match=r"request empty: no completions to score"):
        list(engine.score([ScoreRequest("empty", [img], "Describe.")]))
    with pytest.raises(HalluError, match=r"attention layer 9: the model has \d+ decoder layers"):
        list(engine.attention([ScoreRequest("x", [img], "Describe.", completions=["A dog."])], layers=[9]))


def _split(positions, n_images):
    """Image token positions of a prompt, cut into one equal, consecutive block per image."""
    per = len(positions) // n_images
    assert per * n_images == len(positions)
    return [positions[i * per : (i + 1) * per] for i in range(n_images)]


def test_attention_shares_equal_full_attention_maps(models):
    lm = models["llava"]
    rng = random.Random(7)
    one, left, right = _image(rng), _image(rng, (40, 40)), _image(rng, (48, 32))
    reqs = [ScoreRequest("one", [one], "Describe the image.", completions=["A dog.", "A cat on a red mat."]),
            ScoreRequest("one-q2", [one], "Is there a cat?", completions=["Yes"]),
            ScoreRequest("two", [left, right], "<image> left, <image> right: same?",
                         completions=["No, they differ."])]
    engine = Engine(lm.model, lm.processor, batch_size=3)
    n_layers = lm.model.config.text_config.num_hidden_layers
    got = [a for b in engine.attention(reqs, layers=[0, -1], per_token=True) for a in b]
    assert engine.share_prefix, "the shared path computed these"
    assert lm.model.config.text_config._attn_implementation == "sdpa", "the implementation is restored"
    image_id = lm.model.config.image_token_id
    by_key = {(a.id, a.completion): a for a in got}
    lm.model.set_attn_implementation("eager")
    try:
        for r in reqs:
            for k, text in enumerate(r.completions):
                a = by_key[(r.id, k)]
                assert a.layers == [0, n_layers - 1]
                ids, n, out = _full_forward(lm, r, text, output_attentions=True)
                t = len(engine.completion_ids(r, text, include_eos=False))
                images = _split((ids[:n] == image_id).nonzero()[:, 0], len(r.images))
                assert a.image_tokens == [len(p) for p in images]
                for li, layer in enumerate(a.layers):
                    maps = out.attentions[layer][0].float().mean(0)[n : n + t]  # (completion tokens, keys)
                    per_token = torch.stack([maps[:, p].sum(-1) for p in images], -1)
                    assert torch.tensor(a.per_token[li]) == pytest.approx(per_token, abs=1e-5)
                    assert a.image_shares[li] == pytest.approx(per_token.mean(0).tolist(), abs=1e-5)
                    assert a.text_shares[li] + sum(a.image_shares[li]) == pytest.approx(1.0, abs=1e-5)
                    means = [s / len(p) for s, p in zip(a.image_shares[li], images, strict=True)]
                    assert a.ratios(layer) == pytest.approx([m / sum(means) for m in means], abs=1e-6)
                assert len(a.image_shares[0]) == len(r.images)
                assert 0 < a.image_shares[0][0] < 1
    finally:
        lm.model.set_attn_implementation("sdpa")


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_no_deprecation_reaches_the_user(models, family):
    from transformers.utils import logging as hf_logging

    lm = models[family]
    engine = Engine(lm.model, lm.processor, batch_size=4)
    reqs = _requests(multi_image=True)
    gen_reqs = [GenRequest(r.id, r.images, r.text, image_key=r.image_key) for r in reqs]
    hf_logging.warning_once.cache_clear()  # a message logged "once" earlier in the process would hide here
    handler = _Collect()
    hf_logging.get_logger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert [g for b in engine.generate(gen_reqs, Decoding(max_new_tokens=3)) for g in b]
            assert [c for b in engine.choose(gen_reqs) for c in b]
            assert [s for b in engine.score(reqs) for s in b]
            if family == "llava":
                assert [a for b in engine.attention(reqs, layers=[-1]) for a in b]
    finally:
        hf_logging.get_logger("transformers").removeHandler(handler)
    assert not [m for m in handler.messages if "deprecat" in m.lower()], handler.messages
