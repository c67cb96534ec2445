"""What every revise judge receives: one prompt with all its sampled responses.

A judge is a module with ``OPTIONS`` (its flags and their defaults, recorded in the manifest),
``check(options)`` (validates before anything loads) and
``judge_groups(groups, options, *, progress=None) -> list[dict]`` (Revision dicts). Groups carry all
K samples of a prompt so rankers (clip, attention) can compare them; correctors (openai,
annotations) revise each response on its own.

What the revise stage relies on: exactly one Revision dict per response of every group, with
``id == response_id ==`` the response id (the stage resumes by these ids). Rankers mark the pair they
pick in ``meta["role"]`` (``"chosen"`` / ``"rejected"``; ``meta["rank"]``, lower is better, breaks
ties) and keep their scores and thresholds in ``meta``; :mod:`hallu.pairs` copies them into the pair.
Optional hooks: ``default_method(options)``, ``reset()`` (a stage begins) and ``usage()`` (tokens and
cost, recorded in the manifest).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hallu.records import Prompt, Response


@dataclass
class JudgeGroup:
    prompt: Prompt
    responses: list[Response]
    images: list[Path]  # the prompt's images, resolved to files
