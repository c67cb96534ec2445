"""OPA-DPO (specs/methods.md §5): weighted GT/revised ≻ original pairs, image-masked pairs and the anchor.

A pair record is chosen = the GT answer, rejected = the model's original answer, and
``meta.revised`` = the judge's minimally corrected answer. Token weights come from the judge's
per-sentence report: ``meta.sentences_original`` / ``meta.sentences_revised``, lists of
``{"text", "score" (1-4), "error_type"}``; a token takes the weight of the sentence it falls in.
The reference is the starting model (the OPA model ``hallu sft --method opa-dpo`` makes), frozen.

Only the language model trains in this stage (§5.4): the release keeps the OPA adapter's vision-tower and
projector LoRA weights frozen and trains the LLM LoRA alone. Starting from the OPA model (its adapter
merged), that is a fresh r256/α512 LoRA on the language model's linear layers; ``--full`` freezes the
vision tower and projector.
"""

from __future__ import annotations

from dataclasses import dataclass

from hallu.methods import LoraSpec, MethodSpec

SCORE_WEIGHTS = {1: 2.5, 2: 2.0, 3: 1.5, 4: 1.0}
IMAGE_WEIGHTS = {"image_recognition_error": 3.0, "correct": 1.0, "language_comprehension_error": 1.0}


@dataclass
class Options:
    image_coef: float = 0.2  # P3 + P4 ("CoPO"); 0 turns image focus and the anchor off
    anchor_coef: float = 1.0
    anchor_delta: float = 0.0
    mask_ratio: float = 0.3  # share of pixel positions set to the mean in the masked image
    position_wise: bool = False  # the released code's per-token pairing (parity mode)
    window: int = 0  # position-wise mean over this many slots (the release pads to 896); 0: the batch width
    token_weights: bool = True  # weights from the judge's sentence report (off: all 1)
    # γ·token-mean NLL of the GT answer (or of --sft-data), as HA-DPO's LM term; 0 is the release. Not in
    # OPA-DPO: the shapes demo needs it, where the pair terms alone teach the model to stop listing early.
    sft_weight: float = 0.0


def score_weight(score) -> float:
    """1 -> 2.5 ... 4 -> 1.0; strings are accepted (the judge sometimes returns "3"), unknown -> 1.0."""
    try:
        return SCORE_WEIGHTS.get(int(str(score).strip()), 1.0)
    except ValueError:
        return 1.0


def image_weight(error_type) -> float:
    """image_recognition_error -> 3.0, anything else -> 1.0 (case-insensitive, as the judge's spelling varies)."""
    return IMAGE_WEIGHTS.get(str(error_type or "").strip().lower(), 1.0)


def char_weights(text: str, sentences: list[dict], kind: str) -> list[tuple[int, int, float]]:
    """(start, end, weight) spans of ``text`` for each report sentence found in it, in order."""
    spans, at = [], 0
    for s in sentences or []:
        piece = str(s.get("text", "")).strip()
        if not piece:
            continue
        start = text.find(piece, at)
        if start < 0:
            continue
        w = score_weight(s.get("score")) if kind == "score" else image_weight(s.get("error_type"))
        spans.append((start, start + len(piece), w))
        at = start + len(piece)
    return spans


def token_weights(offsets: list[tuple[int, int]], spans: list[tuple[int, int, float]], n_tokens: int,
                  eos_weight: str) -> list[float]:
    """Per-token weights from character spans; tokens outside every sentence get 1.

    ``offsets`` are the (start, end) characters of the first ``len(offsets)`` tokens; later tokens (the
    appended end-of-sequence) get the previous token's weight (``eos_weight="previous"``, the revised
    answer) or 0 (``"zero"``, the original answer), as in the release.
    """
    out = []
    for start, end in offsets:
        w = 1.0
        for s, e, sw in spans:
            if start < e and s < end:  # overlap: a BPE token " A" starts on the space before its sentence
                w = sw
                break
        out.append(w)
    while len(out) < n_tokens:
        out.append((out[-1] if out else 1.0) if eos_weight == "previous" else 0.0)
    return out[:n_tokens]


SPEC = MethodSpec(
    name="opa-dpo",
    summary="on-policy aligned DPO: weighted GT/revised vs original, image-masked pairs, anchor",
    loss="opa",
    options=Options,
    lora=LoraSpec(r=256, alpha=512, dropout=0.0, target="language", include_vision=False),
    train_vision=False,
    config={"beta": 0.1, "learning_rate": 1e-6, "lr_scheduler_type": "cosine", "warmup_steps": 5,
            "weight_decay": 0.0, "max_grad_norm": 1.0, "num_train_epochs": 4},
    reference="precomputed",
    recommended_start="sft",
    source="§5.3, §5.4",
)
