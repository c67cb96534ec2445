"""Tiny random vision-language models of six families, built from configs (no Hub access).

``build_tiny_model(family, out_dir)`` writes a folder that loads with ``AutoModelForImageTextToText`` and
``AutoProcessor`` and generates from an image and a question through ``processor.apply_chat_template``.
Every family uses its real model, config and processor classes, so ``config.model_type`` is the real one
and code meets the real input layouts: LLaVA's expanded ``<image>`` run, LLaVA-NeXT's any-res tiles and
``image_sizes``, Qwen2-VL's flattened patches with ``image_grid_thw`` and M-RoPE, InstructBLIP's query
tokens and Q-Former text inputs, Idefics3's split frames with ``pixel_attention_mask``.

Two transformers 5.x gaps are repaired by :func:`hallu.processors.load_processor` (re-exported here):
the Qwen2-VL processors cannot be built or loaded without torchvision (a video processor is mandatory),
and ``InstructBlipProcessor`` drops its chat template on load (the tokenizer keeps a copy).

The tokenizer is a byte-level BPE trained here on a small corpus: corpus words are whole tokens, and any
text still encodes. Weights are random, drawn from ``seed``: the same arguments give the same files.

Sizes: ``tiny`` is as small as the architecture allows (2 text layers, hidden 32, 8-88 image tokens);
``bench`` is tiny but not trivial, for speed benchmarks (4 text layers, hidden 128, >= 200 image tokens,
except InstructBLIP, which keeps its real 32 Q-Former queries). ``demo`` (LLaVA only) is the ~0.9 M-parameter
model `hallu demo` trains from scratch on the shapes world in minutes on a CPU: 64x64 images in patches of
16 (16 image tokens, each shapes quadrant = 2x2 patches), a 2-layer CLIP tower whose last layer feeds the
projector, and a 3-layer Llama, hidden 128 throughout.

Heavy libraries are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hallu.coco import CATEGORY_NAMES
from hallu.processors import (  # noqa: F401 - load_processor is part of this module's API
    _QWEN_VIDEO_DEFAULTS,
    _make_video_processor,
    load_processor,
    torchvision_free_video_processors,
)

FAMILIES: tuple[str, ...] = ("llava", "llava-next", "qwen2-vl", "qwen2.5-vl", "instructblip", "idefics3")
SIZES: tuple[str, ...] = ("tiny", "bench", "demo")

# The 80 COCO category names (CHAIR and POPE speak in these words), from the one list in hallu.coco.
COCO_CATEGORIES: tuple[str, ...] = CATEGORY_NAMES

_FUNCTION_WORDS = (
    "a an the this that these those there here is are was were be been being it its they them their "
    "he she his her we you your i me my of in on at to from with without by for and or but not no yes "
    "Yes No yes. no. Yes. No. do does did can could would should will what which who where when how why "
    "many much some any all each every one two three four five six seven eight nine ten image picture "
    "photo scene describe detail details left right top bottom middle center near next behind front "
    "above below under over between beside small large big little red green blue yellow black white "
    "gray orange purple brown pink color shape shapes square circle triangle object objects also only "
    "very please answer question short word single"
)


def default_corpus() -> list[str]:
    """A small built-in corpus: English function words, the COCO categories and a few POPE-style lines."""
    lines = [_FUNCTION_WORDS]
    for name in COCO_CATEGORIES:
        lines.append(f"Is there a {name} in the image?")
        lines.append(f"There is a {name} next to the {name}.")
        plural = name + ("es" if name.endswith(("s", "sh", "ch")) else "s")
        lines.append(f"The image shows two {plural}.")
    lines += [
        "Yes",
        "No",
        "yes",
        "no",
        "Yes, there is.",
        "No, there is not.",
        "Describe the image in detail.",
    ]
    return lines


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z]+")


def _training_lines(
    corpus: Iterable[str], extra_text: Sequence[str] = (), specials: Sequence[str] = ()
) -> list[str]:
    """The corpus plus each of its words bare, after a space and capitalised: each becomes one token.

    Special tokens are cut out of the text first (they are whole tokens anyway; their pieces would only
    waste merges).
    """
    lines = [str(line) for line in [*corpus, *extra_text] if str(line).strip()]
    for special in sorted(specials, key=len, reverse=True):
        lines = [line.replace(special, "\n") for line in lines]
    words = sorted({w for line in lines for w in _WORD.findall(line)})
    variants: list[str] = []
    for w in words:
        for v in {w, w.lower(), w.capitalize()}:
            variants += [v, " " + v]
    # Variants as separate "sentences": the byte-level pre-tokenizer keeps " dog" as one pre-token.
    return lines + sorted(set(variants))


def build_tokenizer(
    corpus: Iterable[str] | None = None,
    *,
    special_tokens: Sequence[str] = ("<unk>", "<s>", "</s>", "<pad>", "<image>"),
    unk_token: str | None = "<unk>",
    bos_token: str | None = "<s>",
    eos_token: str | None = "</s>",
    pad_token: str | None = "<pad>",
    add_bos: bool = True,
    chat_template: str | None = None,
    extra_special_tokens: dict[str, str] | None = None,
    extra_text: Sequence[str] = (),
    padding_side: str | None = "left",
    max_vocab: int = 8192,
    model_max_length: int = 4096,
):
    """A byte-level BPE tokenizer trained on ``corpus`` (a list of lines), wrapped as a fast HF tokenizer.

    Every word of the corpus (and of ``extra_text``, e.g. a rendered chat template) becomes a single token
    in its bare, space-prefixed and capitalised forms; other text still encodes through the 256 byte tokens.
    ``special_tokens`` get the first ids, in order, and are never split. With ``add_bos`` the tokenizer
    prepends ``bos_token`` (Llama style); otherwise it adds nothing (Qwen style, or a template that writes
    the BOS itself). ``padding_side=None`` leaves the side out of the saved config (default right).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(special_tokens))
    lines = _training_lines(default_corpus() if corpus is None else corpus, extra_text, specials)
    tok = Tokenizer(models.BPE(unk_token=unk_token, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max_vocab,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    if add_bos and bos_token is not None:
        bos_id = tok.token_to_id(bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, bos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kwargs: dict[str, Any] = {"padding_side": padding_side} if padding_side else {}
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=unk_token,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        extra_special_tokens=extra_special_tokens or {},
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


def build_wordpiece_tokenizer(corpus: Iterable[str] | None = None, *, extra_text: Sequence[str] = ()):
    """A lower-cased BERT-style WordPiece tokenizer (InstructBLIP's Q-Former tokenizer), right padding.

    The vocabulary is built directly (not trained: the WordPiece trainer is not deterministic): the
    specials, every printable ASCII character alone and as a ``##`` continuation, and every corpus word.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    lines = _training_lines(default_corpus() if corpus is None else corpus, extra_text)
    words = sorted({w.lower() for line in lines for w in _WORD.findall(line)})
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + chars + ["##" + c for c in chars]
    tokens += [w for w in words if w not in set(tokens)]
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    for special in tokens[:6]:
        tok.add_special_tokens([special])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", bos_token="[DEC]", padding_side="right", truncation_side="left",
        model_max_length=512, clean_up_tokenization_spaces=False,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Chat templates (HF renders with trim_blocks: literal newlines are written as {{ '\n' }})
# --------------------------------------------------------------------------------------------------

# Text of a message part list or a plain string; ``IMG`` is what an image part renders to.
_PARTS = (
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}IMG"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
)


def _parts(image: str) -> str:
    return _PARTS.replace("IMG", image)


# LLaVA-1.5 (vicuna_v1 as in llava-hf): "USER: <image>\nQ ASSISTANT: A</s>USER: ..."
LLAVA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}" + _parts("") + "{{ ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' }}" + _parts("<image>{{ '\\n' }}") + "{{ ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}{% generation %}"
    + _parts("")
    + "{{ '</s>' }}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# LLaVA-NeXT (llava-v1.6-mistral): "[INST] <image>\nQ [/INST] A</s>[INST] ..."
LLAVA_NEXT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ '<<SYS>>\\n' }}" + _parts("") + "{{ '\\n<</SYS>>\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '[INST] ' }}"
    + _parts("<image>{{ '\\n' }}")
    + "{{ ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ' }}{% generation %}"
    + _parts("")
    + "{{ '</s>' }}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Qwen2-VL / Qwen2.5-VL ChatML with the default system prompt.
QWEN2_VL_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}{% generation %}"
    + _parts("")
    + "{{ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}" + _parts("<|vision_start|><|image_pad|><|vision_end|>") + "{{ '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# InstructBLIP (Vicuna): the processor puts the query tokens in front of the text itself, so an image part
# renders to nothing here.
INSTRUCTBLIP_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}" + _parts("") + "{{ ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' }}" + _parts("") + "{{ ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}{% generation %}"
    + _parts("")
    + "{{ '</s>' }}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# Idefics3 (Llama 3): "<|begin_of_text|>User:<image>Q<end_of_utterance>\nAssistant: A<end_of_utterance>\n"
IDEFICS3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{%- for message in messages -%}"
    "{{ message['role'] | capitalize }}"
    "{%- if message['content'] is not string and message['content'][0]['type'] == 'image' -%}{{ ':' }}"
    "{%- else -%}{{ ': ' }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{% generation %}"
    + _parts("")
    + "{{ '<end_of_utterance>' }}{% endgeneration %}"
    "{%- else -%}" + _parts("<image>") + "{{ '<end_of_utterance>' }}{%- endif -%}"
    "{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)

_SAMPLE_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "Is there a dog in the image?"}],
    },
    {"role": "assistant", "content": [{"type": "text", "text": "Yes"}]},
    {"role": "user", "content": "Describe the image."},
]


def _render_sample(template: str) -> str:
    """The template rendered on a sample conversation: its literal text (roles, markers) trains the BPE."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[_SAMPLE_MESSAGES], chat_template=template, add_generation_prompt=True
    )
    return rendered[0]


# --------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Size:
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int


_SIZES = {
    "tiny": _Size(text_hidden=32, text_layers=2, text_heads=2, text_kv_heads=2,
                  vision_hidden=32, vision_layers=2, vision_heads=2),
    "bench": _Size(text_hidden=128, text_layers=4, text_heads=4, text_kv_heads=4,
                   vision_hidden=64, vision_layers=2, vision_heads=4),
    "demo": _Size(text_hidden=128, text_layers=3, text_heads=4, text_kv_heads=4,
                  vision_hidden=128, vision_layers=2, vision_heads=4),
}  # fmt: skip
_LLAVA_ONLY_SIZES = ("demo",)


def _llama_text(size: _Size, tok, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), hidden_size=size.text_hidden, intermediate_size=2 * size.text_hidden,
        num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------------


def _build_llava(tok_corpus, size_name: str, size: _Size):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_size, patch = {"tiny": (32, 8), "demo": (64, 16)}.get(size_name, (64, 4))
    # With only 2 vision layers, the usual second-to-last layer would leave the tower one layer deep.
    feature_layer = -1 if size_name == "demo" else -2
    n_img = (image_size // patch) ** 2
    tok = build_tokenizer(
        tok_corpus, chat_template=LLAVA_TEMPLATE, extra_special_tokens={"image_token": "<image>"},
        extra_text=[_render_sample(LLAVA_TEMPLATE)],
    )  # fmt: skip
    vision = CLIPVisionConfig(
        image_size=image_size, patch_size=patch, hidden_size=size.vision_hidden,
        intermediate_size=2 * size.vision_hidden, num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads, projection_dim=size.vision_hidden,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=_llama_text(size, tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=n_img,
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=feature_layer,
    )  # fmt: skip
    model_fn = lambda: LlavaForConditionalGeneration(config)  # noqa: E731
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
        chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1,
    )  # fmt: skip
    info = {"image_token": "<image>", "expected_image_tokens": n_img, "image_size": image_size,
            "patch_size": patch, "vision_feature_layer": feature_layer}  # fmt: skip
    return model_fn, processor, tok, info


def _build_llava_next(tok_corpus, size_name: str, size: _Size):
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        MistralConfig,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tile, patch = (32, 8) if size_name == "tiny" else (64, 8)
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    side = tile // patch
    # A square image picks the 2x2 grid: base tile + (2*side)^2 patches + one newline per row.
    n_img = side * side + (2 * side) * (2 * side) + 2 * side
    tok = build_tokenizer(
        tok_corpus, chat_template=LLAVA_NEXT_TEMPLATE, extra_special_tokens={"image_token": "<image>"},
        extra_text=[_render_sample(LLAVA_NEXT_TEMPLATE)],
    )  # fmt: skip
    vision = CLIPVisionConfig(
        image_size=tile, patch_size=patch, hidden_size=size.vision_hidden,
        intermediate_size=2 * size.vision_hidden, num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads, projection_dim=size.vision_hidden,
    )  # fmt: skip
    text = MistralConfig(
        vocab_size=len(tok), hidden_size=size.text_hidden, intermediate_size=2 * size.text_hidden,
        num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads, max_position_embeddings=4096, sliding_window=None,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints, image_seq_length=side * side, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )  # fmt: skip
    model_fn = lambda: LlavaNextForConditionalGeneration(config)  # noqa: E731
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=ip, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
        chat_template=LLAVA_NEXT_TEMPLATE, num_additional_image_tokens=1,
    )  # fmt: skip
    info = {"image_token": "<image>", "expected_image_tokens": n_img,
            "image_tokens_note": "for a square image; any-res tiling makes it vary with the aspect ratio",
            "image_size": tile, "patch_size": patch, "image_grid_pinpoints": pinpoints,
            "vision_feature_layer": -2}  # fmt: skip
    return model_fn, processor, tok, info


_QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip


def _build_qwen(tok_corpus, size_name: str, size: _Size, v25: bool):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    patch, merge = 4, 2
    side = 32 if size_name == "tiny" else 128  # pixels; images are resized to side*side pixels (area)
    n_img = (side // patch // merge) ** 2
    tok = build_tokenizer(
        tok_corpus, special_tokens=_QWEN_SPECIALS, unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", add_bos=False, chat_template=QWEN2_VL_TEMPLATE,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
        extra_text=[_render_sample(QWEN2_VL_TEMPLATE)],
    )  # fmt: skip
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    head_dim = size.text_hidden // size.text_heads
    q = head_dim // 16  # mrope_section sums to head_dim / 2, in the real 2:3:3 proportion
    text_kwargs = dict(
        vocab_size=len(tok), hidden_size=size.text_hidden, intermediate_size=2 * size.text_hidden,
        num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
        num_key_value_heads=max(1, size.text_kv_heads // 2), max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2 * q, 3 * q, 3 * q]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )  # fmt: skip
    top = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )  # fmt: skip
    if v25:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision = dict(
            depth=size.vision_layers, hidden_size=size.vision_hidden,
            intermediate_size=2 * size.vision_hidden, num_heads=size.vision_heads, patch_size=patch,
            spatial_merge_size=merge, temporal_patch_size=2,
            window_size=patch * merge * 2, out_hidden_size=size.text_hidden,
            fullatt_block_indexes=[size.vision_layers - 1],
        )  # fmt: skip
        config = Qwen2_5_VLConfig(text_config=text_kwargs, vision_config=vision, **top)
        model_fn = lambda: Qwen2_5_VLForConditionalGeneration(config)  # noqa: E731
    else:
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision = dict(
            depth=size.vision_layers, embed_dim=size.vision_hidden, hidden_size=size.text_hidden, mlp_ratio=2,
            num_heads=size.vision_heads, patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2,
        )  # fmt: skip
        config = Qwen2VLConfig(text_config=text_kwargs, vision_config=vision, **top)
        model_fn = lambda: Qwen2VLForConditionalGeneration(config)  # noqa: E731
    pixels = {"shortest_edge": side * side, "longest_edge": side * side}
    ip = Qwen2VLImageProcessorPil(size=pixels, patch_size=patch, temporal_patch_size=2, merge_size=merge)
    video_config = {**_QWEN_VIDEO_DEFAULTS, "size": pixels, "patch_size": patch, "merge_size": merge}
    processor_cls = Qwen2_5_VLProcessor if v25 else Qwen2VLProcessor
    with torchvision_free_video_processors():
        processor = processor_cls(
            image_processor=ip, tokenizer=tok, video_processor=_make_video_processor(video_config),
            chat_template=QWEN2_VL_TEMPLATE,
        )  # fmt: skip
    info = {"image_token": "<|image_pad|>", "expected_image_tokens": n_img,
            "image_tokens_note": "images are resized to about side*side pixels, the grid by aspect ratio",
            "image_side": side, "patch_size": patch, "merge_size": merge}  # fmt: skip
    return model_fn, processor, tok, info


def _build_instructblip(tok_corpus, size_name: str, size: _Size):
    from transformers import (
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    image_size, patch = (32, 8) if size_name == "tiny" else (64, 4)
    n_query = 8 if size_name == "tiny" else 32
    # No ``image_token`` attribute on this tokenizer: InstructBlipProcessor would then take the string and
    # fail on ``.content``; without it the processor registers its own AddedToken "<image>" (already id 4).
    # Neither is ``padding_side`` saved: InstructBlipProcessor forwards every text kwarg found in the LM
    # tokenizer's saved config to the Q-Former tokenizer as well, and the Q-Former (absolute positions) must
    # be padded on the right. Set ``processor.tokenizer.padding_side = "left"`` at run time (an attribute
    # is not forwarded) and do not pass ``padding_side`` to the processor call.
    sample = _render_sample(INSTRUCTBLIP_TEMPLATE)
    tok = build_tokenizer(
        tok_corpus, chat_template=INSTRUCTBLIP_TEMPLATE, extra_text=[sample], padding_side=None
    )
    qtok = build_wordpiece_tokenizer(tok_corpus, extra_text=[sample])
    vision = InstructBlipVisionConfig(
        image_size=image_size, patch_size=patch, hidden_size=size.vision_hidden,
        intermediate_size=2 * size.vision_hidden, num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads, initializer_range=0.02,
    )  # fmt: skip
    qformer = InstructBlipQFormerConfig(
        vocab_size=len(qtok), hidden_size=size.vision_hidden,
        num_hidden_layers=1 if size_name == "tiny" else 2, num_attention_heads=size.vision_heads,
        intermediate_size=2 * size.vision_hidden,
        max_position_embeddings=512, pad_token_id=qtok.pad_token_id, cross_attention_frequency=1,
        encoder_hidden_size=size.vision_hidden, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    config = InstructBlipConfig(
        vision_config=vision, qformer_config=qformer, text_config=_llama_text(size, tok),
        num_query_tokens=n_query, image_token_index=tok.convert_tokens_to_ids("<image>"),
    )  # fmt: skip
    model_fn = lambda: InstructBlipForConditionalGeneration(config)  # noqa: E731
    ip = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = InstructBlipProcessor(
        image_processor=ip, tokenizer=tok, qformer_tokenizer=qtok, num_query_tokens=n_query
    )
    # InstructBlipProcessor.__init__ drops a chat_template argument; set it afterwards so that it is saved
    # (chat_template.jinja). A reload drops it again: the tokenizer keeps a copy (see load_processor).
    processor.chat_template = INSTRUCTBLIP_TEMPLATE
    info = {"image_token": "<image>", "expected_image_tokens": n_query, "image_size": image_size,
            "patch_size": patch, "num_query_tokens": n_query}  # fmt: skip
    return model_fn, processor, tok, info


_IDEFICS3_SPECIALS = (
    "<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<pad>", "<fake_token_around_image>", "<image>",
    "<end_of_utterance>", "<global-img>",
) + tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))  # fmt: skip


def _build_idefics3(tok_corpus, size_name: str, size: _Size):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tile, patch, scale = (32, 4, 2) if size_name == "tiny" else (64, 4, 2)
    per_frame = (tile // patch) ** 2 // (scale * scale)
    tok = build_tokenizer(
        tok_corpus, special_tokens=_IDEFICS3_SPECIALS, bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>", add_bos=False, chat_template=IDEFICS3_TEMPLATE,
        extra_special_tokens={"image_token": "<image>"}, extra_text=[_render_sample(IDEFICS3_TEMPLATE)],
    )  # fmt: skip
    vision = dict(
        image_size=tile, patch_size=patch, hidden_size=size.vision_hidden,
        intermediate_size=2 * size.vision_hidden, num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
    )  # fmt: skip
    config = Idefics3Config(
        vision_config=vision, text_config=_llama_text(size, tok).to_dict(), scale_factor=scale,
        image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )  # fmt: skip
    model_fn = lambda: Idefics3ForConditionalGeneration(config)  # noqa: E731
    ip = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile}, do_image_splitting=True
    )
    processor = Idefics3Processor(
        image_processor=ip, tokenizer=tok, image_seq_len=per_frame, chat_template=IDEFICS3_TEMPLATE
    )
    # A square image of >= 2*tile pixels: 2x2 tiles + the global image, each frame wrapped in markers.
    n_img = 5 * per_frame
    info = {"image_token": "<image>", "expected_image_tokens": n_img, "image_tokens_per_frame": per_frame,
            "image_tokens_note": "<image> tokens only (plus <fake_token_around_image>, <row_i_col_j>,"
                                 " <global-img> markers); up to 2x2 tiles by aspect ratio + a global frame"
                                 " (5 frames if square)",
            "image_size": tile, "patch_size": patch, "scale_factor": scale}  # fmt: skip
    return model_fn, processor, tok, info


def _lecun_init(model, seed: int) -> None:
    """Redraw every matrix as N(0, 1/fan_in) (norms and biases keep their init).

    The families' own inits (std 0.02, InstructBLIP's vision tower 1e-10) leave a tiny random model nearly
    blind to its input: most prompts and images then give the same greedy answer, and a test cannot tell
    one image's cache from another's. At 1/sqrt(fan_in) the answers differ across images and questions.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.dim() < 2:
                continue
            fan_in = param[0].numel() if param.dim() >= 4 else param.shape[-1]  # conv: in*kernel
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32) / fan_in**0.5
            param.copy_(values.to(param.dtype))


def _family_builder(family: str):
    builders = {
        "llava": _build_llava,
        "llava-next": _build_llava_next,
        "qwen2-vl": lambda c, n, s: _build_qwen(c, n, s, v25=False),
        "qwen2.5-vl": lambda c, n, s: _build_qwen(c, n, s, v25=True),
        "instructblip": _build_instructblip,
        "idefics3": _build_idefics3,
    }
    if family not in builders:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    return builders[family]


def _generation_ids(family: str, tok) -> dict[str, Any]:
    """Token ids for ``generation_config``: generation stops at the end of an assistant turn."""
    if family in ("qwen2-vl", "qwen2.5-vl"):
        eot = tok.convert_tokens_to_ids("<|endoftext|>")
        return {
            "bos_token_id": eot,
            "eos_token_id": [tok.eos_token_id, eot],
            "pad_token_id": tok.pad_token_id,
        }
    if family == "idefics3":
        eou = tok.convert_tokens_to_ids("<end_of_utterance>")
        return {"bos_token_id": tok.bos_token_id, "eos_token_id": [eou, tok.eos_token_id],
                "pad_token_id": tok.pad_token_id}  # fmt: skip
    return {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def _count_image_tokens(processor, token: str) -> int:
    """How many image placeholder tokens the processor inserts for one 224x224 image."""
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a dog?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = processor(images=[Image.new("RGB", (224, 224), (128, 128, 128))], text=[prompt])
    token_id = processor.tokenizer.convert_tokens_to_ids(token)
    return sum(1 for i in batch["input_ids"][0] if i == token_id)


def build_tiny_model(
    family: str, out_dir: str | Path, corpus: list[str] | None = None, seed: int = 0, size: str = "tiny"
) -> dict:
    """Build a random-weight VLM of ``family`` and save model + processor to ``out_dir``.

    ``corpus`` (lines of text, e.g. the shapes world's captions and questions) trains the tokenizer: each of
    its words becomes one token; ``None`` uses ``default_corpus()``. The same arguments give the same files.

    Returns a JSON-able dict: ``family``, ``model_type``, ``model_class``, ``processor_class``, ``size``,
    ``seed``, ``parameters`` (= ``sum(p.numel())``), ``image_tokens`` (placeholder tokens the processor
    inserts for one 224x224 image; see ``image_tokens_note`` where it depends on the image's shape),
    ``image_token``/``image_token_id``, ``vocab_size``, ``text_layers``, ``text_hidden_size``, the
    generation ids and ``seconds``, plus family details.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if size not in _SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    if size in _LLAVA_ONLY_SIZES and family != "llava":
        raise ValueError(f"size {size!r} exists for the llava family only, not {family!r}")
    builder = _family_builder(family)
    t0 = time.perf_counter()
    import torch

    if not torch.cuda.is_available():
        # save_pretrained imports deepspeed (through accelerate), which warns that it "fell back" to the CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a sub-second save needs no "Writing model shards" bar
    model_fn, processor, tok, info = builder(corpus, size, _SIZES[size])
    n_image = _count_image_tokens(processor, info["image_token"])
    if n_image != info.pop("expected_image_tokens"):
        raise RuntimeError(
            f"{family}: the processor inserts {n_image} image tokens, the config expects otherwise"
        )
    torch.manual_seed(seed)
    model = model_fn()
    _lecun_init(model, seed)
    model.eval()
    gen_ids = _generation_ids(family, tok)
    for key, value in gen_ids.items():
        setattr(model.generation_config, key, value)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    text_config = model.config.get_text_config()
    return {
        "family": family,
        "model_type": model.config.model_type,
        "model_class": type(model).__name__,
        "processor_class": type(processor).__name__,
        "size": size,
        "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "image_tokens": n_image,
        "image_token_id": tok.convert_tokens_to_ids(info["image_token"]),
        **info,
        "vocab_size": len(tok),
        "text_layers": text_config.num_hidden_layers,
        "text_hidden_size": text_config.hidden_size,
        **gen_ids,
        "seconds": round(time.perf_counter() - t0, 3),
    }
