"""Processors on any machine, and the chat template that renders their prompts.

``load_processor`` is ``AutoProcessor.from_pretrained`` plus two repairs for gaps in transformers 5.x
processor loading, used everywhere hallu loads a processor (``hallu.models``, ``hallu.tiny``):

* Qwen2-VL-style processors need a video processor, and every transformers 5.x video processor needs
  torchvision, which is not installable beside a CPU build of torch; images never touch the video
  processor, so a stand-in that keeps and saves the video settings lets them load;
* some processor classes (InstructBLIP) drop the chat template in their constructor; it is taken back
  from the tokenizer.

``choose_chat_template`` decides which template renders prompts: a ``--chat-template`` file, else the
model's own, else the packaged one of its family (``data/templates``; real checkpoints such as
InstructBLIP ship none). The choice is recorded with every output as a :class:`ChatTemplate`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hallu.errors import HalluError
from hallu.hub import first_line

# --------------------------------------------------------------------------------------------------
# Qwen2-VL without torchvision
#
# In transformers 5.x the Qwen2-VL / Qwen2.5-VL processors require a video processor, and every video
# processor is a torchvision backend: without torchvision, neither building nor loading such a processor
# works (``AutoProcessor.from_pretrained`` raises OSError for the missing video processor, the constructor
# raises AttributeError in its class check). Images never touch the video processor, so a stand-in that only
# keeps (and saves) the video settings is enough. The folder written is the same as with torchvision: its
# ``processor_config.json`` holds a ``video_processor`` entry of type ``Qwen2VLVideoProcessor``.
# --------------------------------------------------------------------------------------------------

_QWEN_VIDEO_DEFAULTS: dict[str, Any] = {
    "video_processor_type": "Qwen2VLVideoProcessor",
    "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "temporal_patch_size": 2,
    "min_frames": 4, "max_frames": 768, "do_sample_frames": False, "max_video_tokens": 128000,
}  # fmt: skip

_STUB_CLASS: list[type] = []


def _torchvision_available() -> bool:
    from transformers.utils import is_torchvision_available

    return bool(is_torchvision_available())


def _video_stub_class() -> type:
    """A stand-in for ``Qwen2VLVideoProcessor``: keeps and saves its settings, refuses videos."""
    if not _STUB_CLASS:
        from transformers.utils import PushToHubMixin

        class TorchvisionFreeVideoProcessor(PushToHubMixin):
            _auto_class = None
            valid_kwargs = None
            model_input_names = ["pixel_values_videos", "video_grid_thw"]

            def __init__(self, config: dict[str, Any]):
                self._config = dict(config)
                for key in ("patch_size", "merge_size", "temporal_patch_size"):
                    setattr(self, key, self._config.get(key))

            def to_dict(self) -> dict[str, Any]:
                return dict(self._config)

            def __call__(self, *args, **kwargs):
                raise ImportError("video inputs need torchvision (this processor was loaded without it)")

            def __repr__(self) -> str:
                return f"TorchvisionFreeVideoProcessor({self._config.get('video_processor_type')})"

        _STUB_CLASS.append(TorchvisionFreeVideoProcessor)
    return _STUB_CLASS[0]


def _make_video_processor(config: dict[str, Any]):
    if _torchvision_available():
        from transformers import Qwen2VLVideoProcessor

        kwargs = {k: v for k, v in config.items() if k != "video_processor_type"}
        return Qwen2VLVideoProcessor(**kwargs)
    return _video_stub_class()(config)


@contextmanager
def torchvision_free_video_processors() -> Iterator[None]:
    """Let Qwen2-VL-style processors be built and loaded when torchvision is missing (a no-op when present).

    Inside it, ``AutoVideoProcessor.from_pretrained`` returns the stand-in built from the folder's
    ``video_processor`` settings and the processor's argument check accepts that stand-in. The patches are
    process-wide while the block runs and undone after it. ``load_processor`` uses it.
    """
    if _torchvision_available():
        yield
        return
    from transformers import processing_utils
    from transformers.models.auto import video_processing_auto

    stub = _video_stub_class()
    mixin = processing_utils.ProcessorMixin
    auto = video_processing_auto.AutoVideoProcessor
    orig_check = mixin.__dict__["check_argument_for_proper_class"]
    orig_from_pretrained = auto.__dict__["from_pretrained"]

    def check(proc, argument_name, argument):
        if isinstance(argument, stub):
            return stub
        return orig_check(proc, argument_name, argument)

    def from_pretrained(path, *args, **kwargs):
        config = dict(_QWEN_VIDEO_DEFAULTS)
        file = Path(path) / (kwargs.get("subfolder") or "") / "processor_config.json"
        if file.is_file():
            config.update(json.loads(file.read_text()).get("video_processor") or {})
        return stub(config)

    mixin.check_argument_for_proper_class = check
    auto.from_pretrained = staticmethod(from_pretrained)
    try:
        yield
    finally:
        mixin.check_argument_for_proper_class = orig_check
        auto.from_pretrained = orig_from_pretrained


def leading_special_text(tokenizer) -> str:
    """The special tokens the tokenizer puts before a text by default (LLaMA's ``<s>``), as text.

    The engine tokenizes rendered prompts with the tokenizer's defaults, as the processor does at inference;
    TRL tokenizes with ``add_special_tokens=False``. Prepending this text to a rendered prompt that lacks it
    makes training see the same prompt tokens as rollout and evaluation.
    """
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if not plain or with_special[len(with_special) - len(plain):] != plain:
        return ""
    lead = with_special[: len(with_special) - len(plain)]
    return "".join(tokenizer.convert_ids_to_tokens(lead))


def load_processor(path: str | Path, **kwargs):
    """``AutoProcessor.from_pretrained(path)`` with two repairs for transformers 5.x.

    * Qwen2-VL-style folders load without torchvision (see ``torchvision_free_video_processors``).
    * A processor whose class drops the chat template (``InstructBlipProcessor.__init__`` does not pass
      ``chat_template`` on) gets the tokenizer's template, so ``processor.apply_chat_template`` works.
    """
    from transformers import AutoProcessor

    with torchvision_free_video_processors():
        processor = AutoProcessor.from_pretrained(path, **kwargs)
    tokenizer = getattr(processor, "tokenizer", None)
    if getattr(processor, "chat_template", None) is None and getattr(tokenizer, "chat_template", None):
        processor.chat_template = tokenizer.chat_template
    return processor


# --------------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------------

# model_type -> packaged template (data/templates/NAME.jinja) for folders that ship no template.
PACKAGED_TEMPLATES = {"llava": "llava-1.5", "instructblip": "instructblip"}
_TEST_QUESTION = "Is there a dog in the image?"


@dataclass(frozen=True)
class ChatTemplate:
    """The template that renders prompts and where it came from: model | packaged:NAME | file:PATH."""

    source: str
    text: str

    @property
    def sha256(self) -> str:
        from hallu.fileio import sha256_bytes

        return sha256_bytes(self.text.encode("utf-8"))

    def recorded(self) -> dict:
        return {"source": self.source, "sha256": self.sha256}


def packaged_template(name: str) -> ChatTemplate:
    from importlib.resources import files

    text = files("hallu.data").joinpath("templates", f"{name}.jinja").read_text(encoding="utf-8")
    return ChatTemplate(f"packaged:{name}", text)


def template_file(path: str | Path) -> ChatTemplate:
    """A ``--chat-template`` file, checked by rendering a one-image test conversation (no torch needed)."""
    p = Path(path)
    if not p.is_file():
        raise HalluError(f"--chat-template {p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise HalluError(f"--chat-template {p}: cannot read it as UTF-8 text ({e})") from e
    template = ChatTemplate(f"file:{p}", text)
    check_renders(template, f"--chat-template {p}")
    return template


def check_renders(template: ChatTemplate, where: str) -> str:
    """Render a user turn (one image + a question) with a generation prompt; the question must appear."""
    import jinja2
    from transformers.utils.chat_template_utils import render_jinja_template

    from hallu.records import user_messages

    try:
        rendered, _ = render_jinja_template(conversations=[user_messages(_TEST_QUESTION, 1)],
                                            chat_template=template.text, add_generation_prompt=True)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise HalluError(f"{where}: the chat template does not render a test conversation "
                         f"({type(e).__name__}: {first_line(e)})") from e
    if _TEST_QUESTION not in rendered[0]:
        raise HalluError(f"{where}: the chat template renders a test conversation without its question "
                         f"(got {rendered[0][:80]!r})")
    return rendered[0]


def own_template(processor) -> str | None:
    """The template a processor came with (a named set's "default"), or None."""
    value = getattr(processor, "chat_template", None)
    if isinstance(value, dict):
        value = value.get("default") or next(iter(value.values()), None)
    return value or None


def choose_chat_template(processor, model_type: str, override: ChatTemplate | None, where: str) -> ChatTemplate:
    """The override, else the model's own template, else its family's packaged one; set on ``processor``."""
    if override is not None:
        template = override
    elif own_template(processor) is not None:
        template = ChatTemplate("model", own_template(processor))
    elif model_type in PACKAGED_TEMPLATES:
        template = packaged_template(PACKAGED_TEMPLATES[model_type])
    else:
        raise HalluError(f"{where}: the model ships no chat template and hallu packages none for "
                         f"'{model_type}' models; pass --chat-template FILE (a jinja template)")
    processor.chat_template = template.text
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and (override is not None or not getattr(tokenizer, "chat_template", None)):
        tokenizer.chat_template = template.text  # trainers that render through the tokenizer see the same
    return template
