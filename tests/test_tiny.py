"""hallu.tiny: six families of tiny random VLMs that load, generate and batch like the real ones."""

import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from PIL import Image, ImageDraw  # noqa: E402

from hallu import tiny  # noqa: E402

CORPUS = [
    "there is a red square , a blue circle and a green triangle .",
    "Is there a dog in the image?",
    "Is there a fire hydrant in the picture?",
    "Describe the image in detail.",
    "a frobnicator next to a zebra",
    "Yes",
    "No",
]
QUESTIONS = [
    "Is there a dog?",
    "Is there a fire hydrant next to the zebra in the picture?",
    "Describe the image.",
]
MODEL_TYPES = {
    "llava": "llava",
    "llava-next": "llava_next",
    "qwen2-vl": "qwen2_vl",
    "qwen2.5-vl": "qwen2_5_vl",
    "instructblip": "instructblip",
    "idefics3": "idefics3",
}
QWEN = ("qwen2-vl", "qwen2.5-vl")


def _image(i: int, size=(96, 80)) -> Image.Image:
    colors = [(200, 30, 30), (30, 160, 40), (40, 40, 210), (220, 220, 220)]
    img = Image.new("RGB", size, colors[i % 4])
    ImageDraw.Draw(img).ellipse((8 + 6 * i, 8, 48 + 6 * i, 56), fill=(250, 230, 0))
    return img


def _prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _generate(model, processor, images, prompts, max_new_tokens=8):
    enc = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return enc, out[:, enc["input_ids"].shape[1] :]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: (root / f, tiny.build_tiny_model(f, root / f, corpus=CORPUS, seed=7)) for f in tiny.FAMILIES}


@pytest.fixture(scope="module")
def loaded(built):
    from transformers import AutoModelForImageTextToText

    out = {}
    for family, (path, _) in built.items():
        model = AutoModelForImageTextToText.from_pretrained(path)
        processor = tiny.load_processor(path)
        processor.tokenizer.padding_side = "left"
        out[family] = (model.eval(), processor)
    return out


def test_import_is_cheap():
    heavy = "('torch', 'transformers', 'tokenizers')"
    code = f"import sys, hallu.tiny; print(sorted(m for m in {heavy} if m in sys.modules))"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        == "[]\n"
    )


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_info_matches_the_saved_model(built, loaded, family):
    path, info = built[family]
    model, processor = loaded[family]
    assert info["family"] == family
    assert info["model_type"] == MODEL_TYPES[family] == model.config.model_type
    assert info["model_class"] == type(model).__name__
    assert info["processor_class"] == type(processor).__name__
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["text_layers"] == model.config.get_text_config().num_hidden_layers == 2
    assert info["vocab_size"] == len(processor.tokenizer)
    assert info["image_token_id"] == processor.tokenizer.convert_tokens_to_ids(info["image_token"])
    gen = model.generation_config
    assert gen.pad_token_id is not None and gen.eos_token_id is not None and gen.bos_token_id is not None
    assert (path / "model.safetensors").is_file() and (path / "chat_template.jinja").is_file()


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_plain_auto_processor(built, family):
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    path, _ = built[family]
    if family in QWEN and not is_torchvision_available():
        # transformers 5.x: the Qwen2-VL processors need a video processor, which needs torchvision.
        with pytest.raises((OSError, ImportError, AttributeError, ValueError)):
            AutoProcessor.from_pretrained(path)
        return
    processor = AutoProcessor.from_pretrained(path)
    assert type(processor).__name__ == built[family][1]["processor_class"]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_generates_from_an_image_and_a_question(built, loaded, family):
    model, processor = loaded[family]
    prompt = _prompt(processor, "Is there a dog in the image?")
    enc, new = _generate(model, processor, [Image.new("RGB", (224, 224), (90, 120, 150))], [prompt])
    assert new.shape == (1, 8) or (new.shape[0] == 1 and new.shape[1] <= 8)
    image_id = built[family][1]["image_token_id"]
    assert int((enc["input_ids"] == image_id).sum()) == built[family][1]["image_tokens"]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_left_padded_batch_equals_one_at_a_time(loaded, family):
    model, processor = loaded[family]
    prompts = [_prompt(processor, q) for q in QUESTIONS]
    images = [
        _image(0, (96, 80)),
        _image(1, (64, 64)),
        _image(2, (120, 72)),
    ]  # any-res / splits differ per row
    enc, batched = _generate(model, processor, images, prompts)
    lengths = enc["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3 and enc["attention_mask"][:, -1].all(), (
        "left padded, rows of different length"
    )
    pad = model.generation_config.pad_token_id
    for row, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        _, single = _generate(model, processor, [image], [prompt])
        single = single[0].tolist()
        assert batched[row, : len(single)].tolist() == single
        assert all(t == pad for t in batched[row, len(single) :].tolist())


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_answers_depend_on_image_and_question(loaded, family):
    model, processor = loaded[family]
    answers = set()
    for i in range(3):
        for q in QUESTIONS[:2]:
            _, new = _generate(model, processor, [_image(i)], [_prompt(processor, q)], max_new_tokens=4)
            answers.add(tuple(new[0].tolist()))
    assert len(answers) >= 3, "random weights that ignore the input would hide engine bugs"


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_corpus_words_are_single_tokens(loaded, family):
    tok = loaded[family][1].tokenizer
    for word in ["dog", "zebra", "frobnicator", "hydrant", "picture", "triangle", "square", "detail"]:
        for form in (word, " " + word, word.capitalize(), " " + word.capitalize()):
            assert len(tok.encode(form, add_special_tokens=False)) == 1, (family, form)
    for word in ("Yes", "No", "yes", "no", " Yes", " No", " yes", " no"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1, (family, word)
    text = "Zwölf Boxkämpfer jagen Viktor quer über den Sylter Deich 42 ✓"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_multi_turn_chat_template(loaded, family):
    processor = loaded[family][1]
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a dog?"}]},
        {"role": "assistant", "content": "Yes"},
        {"role": "user", "content": [{"type": "text", "text": "Describe the image."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A zebra next to a dog."}]},
    ]
    text = processor.apply_chat_template(conversation, tokenize=False)
    assert text.index("Be brief.") < text.index("Is there a dog?") < text.index("Yes")
    assert text.index("Yes") < text.index("Describe the image.") < text.index("A zebra next to a dog.")
    # the generation prompt is a prefix of the conversation that answers it (prompt + completion training)
    prompt = processor.apply_chat_template(conversation[1:2], add_generation_prompt=True, tokenize=False)
    answered = processor.apply_chat_template(conversation[1:3], tokenize=False)
    assert answered.startswith(prompt) and answered[len(prompt) :].strip().startswith("Yes")
    # assistant turns are marked for assistant-only losses
    out = processor.tokenizer.apply_chat_template(
        conversation[1:], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    marked = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    decoded = processor.tokenizer.decode(marked, skip_special_tokens=True)
    assert "Yes" in decoded and "A zebra next to a dog." in decoded and "Describe" not in decoded


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_same_seed_same_files(built, tmp_path, family):
    path, info = built[family]
    again = tiny.build_tiny_model(family, tmp_path / "again", corpus=CORPUS, seed=7)
    assert {k: v for k, v in again.items() if k != "seconds"} == {
        k: v for k, v in info.items() if k != "seconds"
    }
    files = sorted(p.relative_to(path) for p in path.rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file()
    )
    for rel in files:
        assert (path / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    tiny.build_tiny_model(family, tmp_path / "other", corpus=CORPUS, seed=8)
    assert (tmp_path / "other" / "model.safetensors").read_bytes() != (
        path / "model.safetensors"
    ).read_bytes()


def test_default_corpus_and_errors(tmp_path):
    info = tiny.build_tiny_model("llava", tmp_path / "m")
    processor = tiny.load_processor(tmp_path / "m")
    for word in (" dog", " toothbrush", " refrigerator", "Yes", " no"):
        assert len(processor.tokenizer.encode(word, add_special_tokens=False)) == 1
    assert info["image_tokens"] == 16
    with pytest.raises(ValueError, match="unknown family"):
        tiny.build_tiny_model("blip-9", tmp_path / "x")
    with pytest.raises(ValueError, match="unknown size"):
        tiny.build_tiny_model("llava", tmp_path / "x", size="huge")


def test_instructblip_qformer_text_is_right_padded(loaded):
    model, processor = loaded["instructblip"]
    prompts = [_prompt(processor, q) for q in QUESTIONS]
    enc = processor(images=[_image(0)] * 3, text=prompts, return_tensors="pt", padding=True)
    assert enc["qformer_attention_mask"][:, 0].all(), "Q-Former text keeps absolute positions 0..n-1"
    assert not enc["attention_mask"][:, -1].eq(0).any(), "the LM text is left padded"
    n_query = model.config.num_query_tokens
    assert (enc["input_ids"][:, :n_query] == model.config.image_token_index).all(), "query tokens come first"


@pytest.mark.parametrize("family", QWEN)
def test_qwen_processor_saves_and_reloads_without_torchvision(loaded, tmp_path, family):
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    processor = loaded[family][1]
    processor.save_pretrained(tmp_path)
    again = tiny.load_processor(tmp_path)
    assert again.to_dict()["video_processor"] == processor.to_dict()["video_processor"]
    assert again.video_processor.merge_size == 2
    assert ProcessorMixin.check_argument_for_proper_class is check, "the load-time patch is undone"


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_bench_size(tmp_path, family):
    from transformers import AutoModelForImageTextToText

    info = tiny.build_tiny_model(family, tmp_path, corpus=CORPUS, size="bench")
    assert info["text_layers"] == 4 and info["text_hidden_size"] == 128
    if family == "instructblip":
        assert info["image_tokens"] == 32  # the real Q-Former's 32 queries
    else:
        assert info["image_tokens"] >= 200
    if family in ("llava", "qwen2-vl"):
        model = AutoModelForImageTextToText.from_pretrained(tmp_path)
        processor = tiny.load_processor(tmp_path)
        enc, new = _generate(
            model, processor, [_image(1, (128, 128))], [_prompt(processor, "Is there a dog?")], 2
        )
        assert new.shape[1] >= 1
        assert int((enc["input_ids"] == info["image_token_id"]).sum()) == info["image_tokens"]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_training_forward_backward(built, family):
    from transformers import AutoModelForImageTextToText

    path, _ = built[family]
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = tiny.load_processor(path)
    processor.tokenizer.padding_side = "right"
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a dog?"}]},
        {"role": "assistant", "content": "Yes there is a dog."},
    ]
    text = processor.apply_chat_template(conversation, tokenize=False)
    enc = processor(
        images=[_image(0), _image(1)], text=[text, text + " Yes"], return_tensors="pt", padding=True
    )
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    loss = model(**enc, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_demo_size_is_the_shapes_llava(tmp_path):
    from transformers import AutoModelForImageTextToText

    info = tiny.build_tiny_model("llava", tmp_path, corpus=CORPUS, size="demo")
    # 64x64 images in 16-pixel patches: 16 image tokens; hidden 128; the 2-layer tower's last layer is used.
    assert info["image_tokens"] == 16 and info["image_size"] == 64 and info["patch_size"] == 16
    assert info["text_layers"] == 3 and info["text_hidden_size"] == 128 and info["vision_feature_layer"] == -1
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert model.config.vision_config.num_hidden_layers == 2 and model.config.vision_config.hidden_size == 128
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert 0.5e6 < info["parameters"] < 1.5e6  # ~0.9 M plus the BPE vocabulary's embeddings
    processor = tiny.load_processor(tmp_path)
    enc, new = _generate(model, processor, [_image(1, (64, 64))], [_prompt(processor, "Is there a dog?")], 2)
    assert int((enc["input_ids"] == info["image_token_id"]).sum()) == 16 and new.shape[1] >= 1
    with pytest.raises(ValueError, match="llava family only"):
        tiny.build_tiny_model("qwen2-vl", tmp_path / "q", corpus=CORPUS, size="demo")
