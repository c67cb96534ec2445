"""The loss terms of every method, as pure functions of log-probabilities (specs/methods.md §1.2, §2.4, §5.4).

Conventions: per-token log-probs are ``[B, T]`` tensors with a ``[B, T]`` mask (1 on completion tokens,
0 on pads; pads of the log-prob tensors may hold anything, they are zeroed here). A sequence log-prob is
the masked **sum** over tokens, as in HA-DPO and MIA-DPO. Every function returns a scalar loss plus the
detached per-example rewards the trainer logs.

torch is imported inside the functions so importing this module costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class PairTerm:
    """One preference term: the batch-mean loss and the detached rewards r = beta * (policy - ref)."""

    loss: Any
    rewards_chosen: Any
    rewards_rejected: Any


def masked_sum(token_logps, mask):
    """Σ_t mask_t · logp_t per row: the sequence log-prob of §1.2 (pads contribute nothing)."""
    return (token_logps * mask).sum(-1)


def sigmoid_dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
                label_smoothing: float = 0.0) -> PairTerm:
    """Standard DPO on sequence log-probs: −log σ(β[(πc − refc) − (πr − refr)]), batch mean.

    ``label_smoothing`` is TRL's conservative-DPO ε (0 in all four methods).
    """
    import torch.nn.functional as F

    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return PairTerm(losses.mean(), (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def lm_loss(token_logps, mask):
    """Token-mean next-token cross-entropy, −Σ logp / Σ mask over the whole batch (HA-DPO's L_LM, MIA's SFT)."""
    return -(token_logps * mask).sum() / mask.sum().clamp(min=1)


def weighted_pair(delta_chosen, delta_rejected, mask_chosen, mask_rejected, beta: float,
                  w_chosen=None, w_rejected=None, position_wise: bool = False, window: int | None = None
                  ) -> PairTerm:
    """OPA-DPO's generic weighted term for one pair kind (§5.4).

    ``delta_*`` are per-token log-ratios Δ_t = logπθ − logπref, ``[B, T]``; ``w_*`` per-token weights
    (None: all 1).

    * sequence form (default): logit = β(Σ_t w_c,t Δc_t − Σ_t w_d,t Δd_t), loss −log σ(logit), batch mean.
    * ``position_wise`` (the released code): token t of the chosen is paired with token t of the rejected,
      logit_t = w_c,t Δc_t − w_d,t Δd_t, loss −log σ(β logit_t) averaged over B × ``window`` positions;
      pads count as logit 0, i.e. a constant log 2 with no gradient (the code pads to 896 slots).
    """
    import torch.nn.functional as F

    wc = mask_chosen if w_chosen is None else w_chosen * mask_chosen
    wd = mask_rejected if w_rejected is None else w_rejected * mask_rejected
    chosen = wc * delta_chosen
    rejected = wd * delta_rejected
    if not position_wise:
        c, r = chosen.sum(-1), rejected.sum(-1)
        loss = -F.logsigmoid(beta * (c - r)).mean()
        return PairTerm(loss, (beta * c).detach(), (beta * r).detach())
    chosen, rejected = _common_window(chosen, rejected, window)
    per_position = -F.logsigmoid(beta * (chosen - rejected))
    return PairTerm(per_position.mean(), (beta * chosen.sum(-1)).detach(), (beta * rejected.sum(-1)).detach())


def opa_anchor(delta_gt, mask_gt, delta_revised, mask_revised, beta: float, delta: float = 0.0,
               position_wise: bool = False, window: int | None = None):
    """OPA-DPO's anchor (§5.4): the GT answer anchored up, the revised answer anchored **down** (issue #4).

    The released code adds four pieces that collapse to 2·[−log σ(βΔ(gt) − δ)] + 2·[−log σ(−βΔ(r) + δ)].
    Sequence form: Δ is the summed log-ratio, batch mean. Position-wise: per token, mean over B × window
    (pads are Δ = 0, so each contributes 2·log 2 + 2·log 2 with no gradient).
    """
    import torch.nn.functional as F

    gt = delta_gt * mask_gt
    rev = delta_revised * mask_revised
    if position_wise:
        gt, rev = _common_window(gt, rev, window)
    else:
        gt, rev = gt.sum(-1), rev.sum(-1)
    per = -2 * F.logsigmoid(beta * gt - delta) - 2 * F.logsigmoid(-beta * rev + delta)
    return per.mean()


def _common_window(a, b, window: int | None):
    """Right-pad two ``[B, T]`` tensors with zeros to one width (``window`` if given)."""
    import torch.nn.functional as F

    width = max(a.shape[-1], b.shape[-1]) if window is None else window
    if a.shape[-1] > width or b.shape[-1] > width:
        raise ValueError(f"sequences of {max(a.shape[-1], b.shape[-1])} tokens do not fit a window of {width}")
    return F.pad(a, (0, width - a.shape[-1])), F.pad(b, (0, width - b.shape[-1]))


@dataclass
class OpaInputs:
    """Per-token log-ratios and masks of OPA-DPO's five sequences, each ``[B, T]``.

    gt / original / revised continue the real image; gt_masked / revised_masked continue the masked image.
    """

    gt: Any
    gt_mask: Any
    original: Any
    original_mask: Any
    revised: Any
    revised_mask: Any
    gt_masked: Any = None
    revised_masked: Any = None
    score_w_original: Any = None
    score_w_revised: Any = None
    img_w_revised: Any = None


def opa_dpo_loss(x: OpaInputs, beta: float, image_coef: float = 0.2, anchor_coef: float = 1.0,
                 anchor_delta: float = 0.0, position_wise: bool = False, window: int | None = None
                 ) -> tuple[Any, dict[str, Any], PairTerm]:
    """L = P1 + P2 + image_coef·(P3 + P4) + anchor_coef·A (§5.4). Returns (loss, terms by name, P1).

    P1: gt ≻ original (weights 1). P2: revised ≻ original with score weights. P3: gt with the image ≻ gt with
    the masked image. P4: revised ≻ revised-masked, image-relation weights on both sides. With
    ``image_coef == 0`` (CoPO off) the masked sequences and the anchor are not needed.
    """
    kw = {"beta": beta, "position_wise": position_wise, "window": window}
    p1 = weighted_pair(x.gt, x.original, x.gt_mask, x.original_mask, **kw)
    p2 = weighted_pair(x.revised, x.original, x.revised_mask, x.original_mask,
                       w_chosen=x.score_w_revised, w_rejected=x.score_w_original, **kw)
    terms = {"pair_gt": p1.loss, "pair_revised": p2.loss}
    loss = p1.loss + p2.loss
    if image_coef:
        p3 = weighted_pair(x.gt, x.gt_masked, x.gt_mask, x.gt_mask, **kw)
        p4 = weighted_pair(x.revised, x.revised_masked, x.revised_mask, x.revised_mask,
                           w_chosen=x.img_w_revised, w_rejected=x.img_w_revised, **kw)
        terms.update(image_gt=p3.loss, image_revised=p4.loss)
        loss = loss + image_coef * (p3.loss + p4.loss)
        if anchor_coef:
            a = opa_anchor(x.gt, x.gt_mask, x.revised, x.revised_mask, beta, anchor_delta, position_wise, window)
            terms["anchor"] = a
            loss = loss + anchor_coef * a
    return loss, terms, p1
