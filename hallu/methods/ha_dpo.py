"""HA-DPO (specs/methods.md §2): DPO on style-consistent rewrites, plus an auxiliary LM term γ.

Pairs may carry all rewrites of each side (``meta.chosen_variants`` / ``meta.rejected_variants``);
``pair_policy`` picks from them: ``offline`` one of each per pair, drawn once with seed 42 (the LLaVA
release), ``all`` the i-th chosen with the i-th rejected (the paper's count), ``online`` a fresh draw of
one chosen and one rejected each epoch (the InstructBLIP / MiniGPT-4 dataset classes, §2.5). The LM term
is the token-mean NLL of SFT samples (``--sft-data``, else the run's prepared prompts; the chosen answers
only when there are none) weighted by γ (MiniGPT-4's 0.5; the LLaVA-1.5 release uses 0).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hallu.errors import HalluError
from hallu.methods import LoraSpec, MethodSpec

PAIR_POLICIES = ("offline", "all", "online")


@dataclass
class Options:
    sft_weight: float = 0.5  # γ of L = L_DPO + γ·L_LM
    pair_policy: str = "offline"
    seed: int = 42


def expand_variants(pair: dict, policy: str, seed: int) -> list[tuple[str, str, str]]:
    """(suffix, chosen, rejected) triples a pair record yields under ``policy`` (the record itself if no variants)."""
    meta = pair.get("meta") or {}
    chosen = meta.get("chosen_variants") or [pair["chosen"]]
    rejected = meta.get("rejected_variants") or [pair["rejected"]]
    if policy not in PAIR_POLICIES:
        raise HalluError(f"--set ha-dpo.pair_policy={policy}: choose one of {', '.join(PAIR_POLICIES)}")
    if policy == "offline":
        rng = random.Random(f"{seed}:{pair['id']}")
        return [("", rng.choice(chosen), rng.choice(rejected))]
    if policy == "online":
        # every variant once, so each gets reference log-probs; view i holds chosen i and rejected i (cycled)
        n = max(len(chosen), len(rejected))
        return [(f"~{i}", chosen[i % len(chosen)], rejected[i % len(rejected)]) for i in range(n)]
    n = min(len(chosen), len(rejected))
    return [(f"~{i}" if n > 1 else "", chosen[i], rejected[i]) for i in range(n)]


def online_draw(pair_id: str, n_chosen: int, n_rejected: int, seed: int, epoch: int) -> tuple[int, int]:
    """The (chosen, rejected) variant indices the ``online`` policy trains on in ``epoch``: reproducible per pair."""
    rng = random.Random(f"{seed}:{pair_id}:{epoch}")
    return rng.randrange(n_chosen), rng.randrange(n_rejected)


SPEC = MethodSpec(
    name="ha-dpo",
    summary="DPO on style-consistent GPT-4 rewrites + gamma * LM loss",
    loss="sigmoid",
    options=Options,
    lora=LoraSpec(r=128, alpha=256, dropout=0.05),
    config={"beta": 0.1, "learning_rate": 2e-6, "lr_scheduler_type": "cosine", "warmup_ratio": 0.03,
            "weight_decay": 0.0, "max_grad_norm": 1.0, "num_train_epochs": 1},
    reference="precomputed",
    source="§2.4 (LLaVA-1.5-7B column; gamma from the MiniGPT-4 column)",
)
