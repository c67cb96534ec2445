"""The shared-prompt pair forward equals separate forwards, and runs the vision tower once per prompt."""

import random

import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from hallu import tiny  # noqa: E402
from hallu.models import load_model  # noqa: E402
from hallu.train import pair_forward as pf  # noqa: E402

ANSWERS = [
    ("There is a dog next to the cat.", "There is a fork."),
    ("The image shows two cups.", "There is a pizza next to the bowl and a knife."),
    ("Yes", "No, there is not."),
]


@pytest.fixture(scope="module", params=["llava", "llava-next"])
def lm(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("pf-" + request.param)
    tiny.build_tiny_model(request.param, root, seed=3)
    loaded = load_model(root, device="cpu", dtype="float32")
    loaded.model.eval()
    return loaded


def _batch(lm, n_images=1):
    rng = random.Random(0)
    prompts, images, comps = [], [], []
    for i, (chosen, rejected) in enumerate(ANSWERS):
        ims = [Image.new("RGB", (40 + 8 * i, 32), tuple(rng.randrange(256) for _ in range(3)))
               for _ in range(n_images)]
        question = ("Describe the image in detail." if i else "Is there a dog in the image?")
        if n_images > 1:
            question = " ".join(f"Image {j}: <image>" for j in range(n_images)) + " " + question
        text = pf.render_prompt(lm.processor, question, n_images)
        prompts.append(text)
        images.append(ims)
        comps.append([pf.completion_ids(lm.processor, question, n_images, a, text) for a in (chosen, rejected)])
    return prompts, images, comps


def _count_vision_rows(model):
    seen = []
    tower = model.model.vision_tower
    handle = tower.register_forward_hook(lambda mod, args, kwargs_out: seen.append(args[0].shape[0]))
    return seen, handle


def _separate(lm, prompts, images, comps):
    """One forward per (prompt, answer): the ground truth."""
    pad = lm.processor.tokenizer.pad_token_id
    out = []
    for text, ims, cs in zip(prompts, images, comps, strict=True):
        for c in cs:
            enc = pf.encode_prompts(lm.processor, [text], [ims])
            r = pf.continuation_logps(lm.model, enc, [[c]], pad, share_prompt=False)
            out.append(r.token_logps[0, : len(c)])
    return out


def test_completion_ids_end_with_the_templates_end_marker(lm):
    ids = pf.completion_ids(lm.processor, "Is there a dog?", 1, "Yes")
    tok = lm.processor.tokenizer
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True).strip() == "Yes"


@pytest.mark.parametrize("n_images", [1, 2])
def test_shared_prompt_equals_separate_forwards(lm, n_images):
    if n_images == 2 and lm.model_type != "llava":
        pytest.skip("multi-image prompts are checked on LLaVA")
    prompts, images, comps = _batch(lm, n_images)
    pad = lm.processor.tokenizer.pad_token_id
    expected = _separate(lm, prompts, images, comps)
    assert pf.can_share_prompt(lm.model)
    seen, handle = _count_vision_rows(lm.model)
    try:
        enc = pf.encode_prompts(lm.processor, prompts, images)
        shared = pf.continuation_logps(lm.model, enc, comps, pad)
        shared_rows = sum(seen)
        seen.clear()
        enc2 = pf.encode_prompts(lm.processor, prompts, images, repeat=2)
        plain = pf.continuation_logps(lm.model, enc2, comps, pad, share_prompt=False)
        plain_rows = sum(seen)
    finally:
        handle.remove()
    # the vision tower saw each prompt's images once, the plain (TRL-style) path twice
    assert plain_rows == 2 * shared_rows
    assert len(seen) == 1
    for row, want in enumerate(expected):
        n = want.shape[0]
        assert shared.mask[row].sum().item() == n
        torch.testing.assert_close(shared.token_logps[row, :n], want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(plain.token_logps[row, :n], want, rtol=1e-4, atol=1e-5)
        assert shared.token_logps[row, n:].abs().sum().item() == 0.0
    seq_shared = shared.sequence_logps()
    seq_want = torch.stack([w.sum() for w in expected])
    torch.testing.assert_close(seq_shared, seq_want, rtol=1e-4, atol=1e-4)


def test_gradients_flow_through_the_shared_prompt(lm):
    prompts, images, comps = _batch(lm)
    pad = lm.processor.tokenizer.pad_token_id
    model = lm.model
    grads = {}
    for share in (True, False):
        model.zero_grad()
        enc = pf.encode_prompts(lm.processor, prompts, images, repeat=1 if share else 2)
        r = pf.continuation_logps(model, enc, comps, pad, share_prompt=share)
        r.sequence_logps().sum().backward()
        grads[share] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads[True]) == set(grads[False])
    assert any("vision_tower" in n for n in grads[True])  # the image encoder is trained through the cache
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-3, atol=1e-5)
    model.zero_grad()


def test_unpadded_prompts_of_the_wrong_side_are_refused(lm):
    prompts, images, comps = _batch(lm)
    enc = pf.encode_prompts(lm.processor, prompts, images)
    enc["attention_mask"] = enc["attention_mask"].flip(-1)  # as if left padded
    with pytest.raises(ValueError, match="right padded"):
        pf.continuation_logps(lm.model, enc, comps, 0)


def test_mask_pixels_sets_the_ratio_to_the_mean():
    pv = torch.arange(2 * 3 * 10 * 10, dtype=torch.float32).reshape(2, 3, 10, 10)
    g = torch.Generator().manual_seed(0)
    out = pf.mask_pixels(pv, 0.3, generator=g)
    changed = (out != pv).any(1)  # a pixel position: all channels change together
    assert ((out != pv).sum(1) % 3 == 0).all()
    assert 0.15 < changed.float().mean().item() < 0.45
    assert torch.all(out[:, 0][changed] == pv.mean())


def test_check_fits_names_the_fix():
    from hallu.errors import HalluError

    with pytest.raises(HalluError, match=r"pairs.jsonl:3: the prompt is 600 tokens \(576 of them image tokens\).*"
                                         r"max_length=856"):
        pf.check_fits(600, 576, 512, "pairs.jsonl:3")
    pf.check_fits(600, 576, 1024, "x")


@pytest.fixture(scope="module", params=["qwen2-vl", "instructblip"])
def qwen(request, tmp_path_factory):
    """The models that take the plain path: Qwen2-VL (M-RoPE) and InstructBLIP (text-dependent Q-Former)."""
    root = tmp_path_factory.mktemp("pf-" + request.param)
    tiny.build_tiny_model(request.param, root, seed=3)
    loaded = load_model(root, device="cpu", dtype="float32")
    loaded.model.eval()
    return loaded


def _full_sequence_logps(lm, text, ims, completion):
    """Ground truth without pair_forward: one full forward of prompt + completion, log-softmax at each answer token."""
    enc = lm.processor(text=[text], images=ims, return_tensors="pt")
    n = enc["input_ids"].shape[1]
    comp = torch.tensor([completion])
    inputs = dict(enc)
    inputs["input_ids"] = torch.cat([enc["input_ids"], comp], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            inputs[key] = torch.cat([enc[key], torch.zeros_like(comp)], 1)
    with torch.no_grad():
        logits = lm.model(**inputs).logits[0]
    logps = logits[n - 1 : n - 1 + len(completion)].log_softmax(-1)
    return logps.gather(-1, comp[0][:, None])[:, 0]


def test_plain_path_equals_full_forwards(qwen):
    """K right-padded rows per prompt give the same numbers as one full forward per answer."""
    assert not pf.can_share_prompt(qwen.model)
    prompts, images, comps = _batch(qwen)
    pad = qwen.processor.tokenizer.pad_token_id
    enc = pf.encode_prompts(qwen.processor, prompts, images, repeat=2)
    with torch.no_grad():
        got = pf.continuation_logps(qwen.model, enc, comps, pad)
    with pytest.raises(ValueError, match="K times"):  # the shared layout is refused on this model
        pf.continuation_logps(qwen.model, pf.encode_prompts(qwen.processor, prompts, images), comps, pad)
    row = 0
    for text, ims, cs in zip(prompts, images, comps, strict=True):
        for c in cs:
            want = _full_sequence_logps(qwen, text, ims, c)
            assert got.mask[row].sum().item() == len(c)
            torch.testing.assert_close(got.token_logps[row, : len(c)], want, rtol=1e-4, atol=1e-5)
            row += 1
