"""MIA-DPO (specs/methods.md §4): DPO on multi-image prompts (one ``<image>`` tag per image).

The reference is the base with the LoRA adapter disabled, as in the release; γ (the SFT weight) is 0 in
its script.
"""

from __future__ import annotations

from dataclasses import dataclass

from hallu.methods import LoraSpec, MethodSpec


@dataclass
class Options:
    sft_weight: float = 0.0


SPEC = MethodSpec(
    name="mia-dpo",
    summary="DPO on multi-image augmented pairs, reference = adapter disabled",
    loss="sigmoid",
    options=Options,
    lora=LoraSpec(r=128, alpha=256, dropout=0.05),
    config={"beta": 0.1, "learning_rate": 5e-5, "lr_scheduler_type": "linear", "warmup_ratio": 0.1,
            "weight_decay": 0.0, "num_train_epochs": 1},
    reference="adapter-off",
    source="§4.7",
)
