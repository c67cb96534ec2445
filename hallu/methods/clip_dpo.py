"""CLIP-DPO (specs/methods.md §3): plain DPO on CLIP-ranked self-generated pairs.

No code was released; the training defaults are ours (§3.3), the ranking lives in the revise stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from hallu.methods import LoraSpec, MethodSpec


@dataclass
class Options:
    sft_weight: float = 0.0


SPEC = MethodSpec(
    name="clip-dpo",
    summary="plain DPO on CLIP-ranked pairs (defaults are ours; no released code)",
    loss="sigmoid",
    options=Options,
    lora=LoraSpec(r=128, alpha=256, dropout=0.05),
    config={"beta": 0.1},
    source="§3.3",
)
