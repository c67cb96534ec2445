"""Judges for the revise stage and for GPT-judged benchmarks (openai, ...).

``JUDGES`` maps a ``hallu revise --judge`` name to the module implementing it (see base.py for the
interface); modules are imported only when chosen, so the CLI stays light.
"""

import importlib

JUDGES = {
    "openai": "hallu.judges.revise_openai",
    "annotations": "hallu.judges.annotations",
    "clip": "hallu.judges.clip",
    "attention": "hallu.judges.attention",
}


def load_judge(name: str):
    """The module of judge ``name``; an unknown name is one clear error."""
    from hallu.errors import HalluError

    if name not in JUDGES:
        raise HalluError(f"--judge: unknown judge {name!r} (choose from {', '.join(JUDGES)})")
    return importlib.import_module(JUDGES[name])
