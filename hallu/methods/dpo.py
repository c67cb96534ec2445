"""Plain sigmoid DPO (specs/methods.md §1.2): the baseline every other method extends."""

from __future__ import annotations

from dataclasses import dataclass

from hallu.methods import LoraSpec, MethodSpec


@dataclass
class Options:
    sft_weight: float = 0.0  # γ: token-mean NLL of the chosen answer added to the loss (0: pure DPO)


SPEC = MethodSpec(
    name="dpo",
    summary="sigmoid DPO, beta 0.1, summed log-probs",
    loss="sigmoid",
    options=Options,
    lora=LoraSpec(r=128, alpha=256, dropout=0.05),
    config={"beta": 0.1},
    source="§1.2",
)
