"""The preference-optimisation methods: one module each, holding its defaults and its loss switches.

A method module is pure: a :class:`MethodSpec` (training defaults from specs/methods.md, the reference it
wants, LoRA settings) and an ``Options`` dataclass of its own loss switches, set from the command line as
``--set <method>.<field>=value``. Adding a method is one module here plus one line in ``_MODULES``.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any

from hallu.errors import HalluError

_MODULES = {"dpo": "dpo", "ha-dpo": "ha_dpo", "opa-dpo": "opa_dpo", "clip-dpo": "clip_dpo", "mia-dpo": "mia_dpo"}
METHOD_NAMES: tuple[str, ...] = tuple(_MODULES)


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: float
    dropout: float
    target: str = "language"  # hallu.train.common.lora_config's target
    include_vision: bool = False


@dataclass(frozen=True)
class MethodSpec:
    """What a method trains with unless the user says otherwise."""

    name: str
    summary: str
    loss: str  # "sigmoid" (sequence DPO, plus an optional LM term) or "opa" (weighted multi-pair + anchor)
    options: type  # the dataclass of the method's loss switches
    lora: LoraSpec
    # DPOConfig fields this method sets (the user's --set wins)
    config: dict[str, Any] = field(default_factory=dict)
    reference: str = "precomputed"  # "precomputed" (frozen start, stored with the data) or "adapter-off"
    recommended_start: str | None = None  # the stage whose output the method expects to start from
    # False: the vision tower and projector stay frozen in this stage (the LoRA leaves them out, and
    # --full freezes them too)
    train_vision: bool = True
    source: str = ""  # where in specs/methods.md the defaults come from


def get_method(name: str) -> MethodSpec:
    """The spec of a method by name; a typo lists the known names."""
    if name not in _MODULES:
        close = difflib.get_close_matches(name, METHOD_NAMES, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise HalluError(f"--method {name}: unknown method{hint}; known: {', '.join(METHOD_NAMES)}")
    module = importlib.import_module(f"hallu.methods.{_MODULES[name]}")
    return module.SPEC


def split_set_items(items: list[str], method: str) -> tuple[list[str], list[str]]:
    """``--set`` items for DPOConfig and those for the method (``<method>.<field>=value``, prefix removed)."""
    config, own = [], []
    for item in items:
        key = item.partition("=")[0].strip()
        prefix, dot, rest = key.partition(".")
        if dot and prefix in _MODULES:
            if prefix != method:
                raise HalluError(f"--set {key}: an option of {prefix}, but --method is {method}")
            own.append(rest + item[len(key):])
        else:
            config.append(item)
    return config, own


def names() -> list[str]:
    """The known method names (``hallu sft --method`` reads them too)."""
    return list(METHOD_NAMES)
