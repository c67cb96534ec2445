"""Every loss term against a hand computation (plain floats and math.log, not the code under test)."""

import math

import pytest

torch = pytest.importorskip("torch")

from hallu.train import losses  # noqa: E402


def nls(x: float) -> float:
    """−log σ(x), by hand."""
    return math.log(1.0 + math.exp(-x))


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_sigmoid_dpo_matches_hand_computation():
    # pair 0: chosen ratio (-5 - -6) = 1, rejected ratio (-9 - -7) = -2 -> logit 0.1 * 3 = 0.3
    # pair 1: chosen ratio -1, rejected ratio 0.5 -> logit 0.1 * -1.5 = -0.15
    term = losses.sigmoid_dpo(t([-5.0, -3.0]), t([-9.0, -4.5]), t([-6.0, -2.0]), t([-7.0, -5.0]), beta=0.1)
    assert term.loss.item() == pytest.approx((nls(0.3) + nls(-0.15)) / 2, rel=1e-12)
    assert term.rewards_chosen.tolist() == pytest.approx([0.1, -0.1])
    assert term.rewards_rejected.tolist() == pytest.approx([-0.2, 0.05])
    assert not term.rewards_chosen.requires_grad


def test_sigmoid_dpo_label_smoothing():
    term = losses.sigmoid_dpo(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.5, label_smoothing=0.1)
    logit = 0.5 * (1.0 - (-1.0))
    assert term.loss.item() == pytest.approx(0.9 * nls(logit) + 0.1 * nls(-logit), rel=1e-12)


def test_sequence_logp_is_a_masked_sum():
    logps = t([[-1.0, -2.0, -40.0], [-0.5, -0.25, -0.125]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    assert losses.masked_sum(logps, mask).tolist() == [-3.0, -0.875]


def test_lm_loss_is_a_token_mean_over_the_batch():
    # HA-DPO's auxiliary term: 5 real tokens, summed nll 1+2+0.5+0.25+0.125 = 3.875
    logps = t([[-1.0, -2.0, -99.0], [-0.5, -0.25, -0.125]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    assert losses.lm_loss(logps, mask).item() == pytest.approx(3.875 / 5)


def test_weighted_pair_sequence_form():
    dc, dd = t([[0.5, -1.0, 2.0]]), t([[1.0, 3.0, 0.0]])
    mc, md = t([[1, 1, 1]]), t([[1, 1, 0]])
    wc, wd = t([[2.5, 1.0, 1.5]]), t([[1.0, 2.0, 9.0]])
    term = losses.weighted_pair(dc, dd, mc, md, beta=0.1, w_chosen=wc, w_rejected=wd)
    c = 2.5 * 0.5 + 1.0 * -1.0 + 1.5 * 2.0  # 3.25
    r = 1.0 * 1.0 + 2.0 * 3.0  # the masked third token (weight 9) does not count -> 7
    assert term.loss.item() == pytest.approx(nls(0.1 * (c - r)), rel=1e-12)
    assert term.rewards_chosen.item() == pytest.approx(0.325)
    assert term.rewards_rejected.item() == pytest.approx(0.7)


def test_weighted_pair_position_wise_reproduces_the_released_form():
    # chosen has 3 tokens, rejected 2; window 4: positions 3 and (for rejected) 2 are pads (Δ 0)
    dc, dd = t([[0.5, -1.0, 2.0]]), t([[1.0, 3.0]])
    mc, md = t([[1, 1, 1]]), t([[1, 1]])
    wc, wd = t([[2.0, 1.0, 1.0]]), t([[1.0, 0.5]])
    term = losses.weighted_pair(dc, dd, mc, md, beta=0.1, w_chosen=wc, w_rejected=wd,
                                position_wise=True, window=4)
    per = [nls(0.1 * (2.0 * 0.5 - 1.0)), nls(0.1 * (-1.0 - 1.5)), nls(0.1 * 2.0), math.log(2.0)]
    assert term.loss.item() == pytest.approx(sum(per) / 4, rel=1e-12)


def test_position_wise_pads_carry_no_gradient():
    dc = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    dd = torch.zeros(1, 2, dtype=torch.float64)
    term = losses.weighted_pair(dc, dd, t([[1, 0]]), t([[1, 0]]), beta=1.0, position_wise=True)
    term.loss.backward()
    # d/dx −log σ(x) at 0 is −1/2, averaged over 2 positions; the pad position gets nothing
    assert dc.grad.tolist() == [[-0.25, 0.0]]


def test_window_too_small_is_an_error():
    with pytest.raises(ValueError, match="window of 2"):
        losses.weighted_pair(t([[1.0, 1.0, 1.0]]), t([[1.0]]), t([[1, 1, 1]]), t([[1]]), beta=0.1,
                             position_wise=True, window=2)


def test_anchor_sequence_form_lifts_gt_and_lowers_revised():
    gt, rev = t([[1.0, 2.0], [0.0, -1.0]]), t([[0.5, 0.5], [4.0, 0.0]])
    mask = t([[1, 1], [1, 0]])
    a = losses.opa_anchor(gt, mask, rev, mask, beta=0.1, delta=0.0)
    row0 = 2 * nls(0.1 * 3.0) + 2 * nls(-0.1 * 1.0)
    row1 = 2 * nls(0.1 * 0.0) + 2 * nls(-0.1 * 4.0)
    assert a.item() == pytest.approx((row0 + row1) / 2, rel=1e-12)
    # The sign: raising the revised answer's likelihood raises the anchor loss (issue #4 of OPA-DPO)
    higher = losses.opa_anchor(gt, mask, rev + 1.0, mask, beta=0.1)
    assert higher.item() > a.item()


def test_anchor_position_wise():
    gt, rev = t([[1.0, 2.0]]), t([[0.5]])
    a = losses.opa_anchor(gt, t([[1, 1]]), rev, t([[1]]), beta=0.1, position_wise=True, window=3)
    per = [2 * nls(0.1) + 2 * nls(-0.05), 2 * nls(0.2) + 2 * nls(0.0), 2 * nls(0.0) + 2 * nls(0.0)]
    assert a.item() == pytest.approx(sum(per) / 3, rel=1e-12)


def _opa_inputs():
    one = t([[1, 1]])
    return losses.OpaInputs(
        gt=t([[0.2, 0.4]]), gt_mask=one, original=t([[-0.3, 0.1]]), original_mask=one,
        revised=t([[0.6, -0.2]]), revised_mask=one, gt_masked=t([[1.0, 1.0]]), revised_masked=t([[-0.5, 0.5]]),
        score_w_original=t([[2.5, 1.0]]), score_w_revised=t([[1.0, 1.5]]), img_w_revised=t([[3.0, 1.0]]),
    )


def test_opa_dpo_total_is_the_weighted_sum_of_its_four_pairs_and_the_anchor():
    x = _opa_inputs()
    loss, terms, _ = losses.opa_dpo_loss(x, beta=0.1, image_coef=0.2, anchor_coef=1.0)
    p1 = nls(0.1 * ((0.2 + 0.4) - (-0.3 + 0.1)))
    p2 = nls(0.1 * ((1.0 * 0.6 + 1.5 * -0.2) - (2.5 * -0.3 + 1.0 * 0.1)))
    p3 = nls(0.1 * ((0.2 + 0.4) - (1.0 + 1.0)))
    p4 = nls(0.1 * ((3.0 * 0.6 + 1.0 * -0.2) - (3.0 * -0.5 + 1.0 * 0.5)))
    anchor = 2 * nls(0.1 * 0.6) + 2 * nls(-0.1 * 0.4)
    assert terms["pair_gt"].item() == pytest.approx(p1, rel=1e-12)
    assert terms["pair_revised"].item() == pytest.approx(p2, rel=1e-12)
    assert terms["image_gt"].item() == pytest.approx(p3, rel=1e-12)
    assert terms["image_revised"].item() == pytest.approx(p4, rel=1e-12)
    assert terms["anchor"].item() == pytest.approx(anchor, rel=1e-12)
    assert loss.item() == pytest.approx(p1 + p2 + 0.2 * (p3 + p4) + anchor, rel=1e-12)


def test_opa_dpo_without_image_focus_drops_the_masked_pairs_and_the_anchor():
    x = _opa_inputs()
    x.gt_masked = x.revised_masked = None  # not needed, and not read
    loss, terms, _ = losses.opa_dpo_loss(x, beta=0.1, image_coef=0.0)
    assert set(terms) == {"pair_gt", "pair_revised"}
    assert loss.item() == pytest.approx(terms["pair_gt"].item() + terms["pair_revised"].item())


def test_opa_dpo_position_wise_switch_changes_the_value():
    x = _opa_inputs()
    seq, _, _ = losses.opa_dpo_loss(x, beta=0.1)
    pos, terms, _ = losses.opa_dpo_loss(x, beta=0.1, position_wise=True)
    p1 = (nls(0.1 * (0.2 + 0.3)) + nls(0.1 * (0.4 - 0.1))) / 2
    assert terms["pair_gt"].item() == pytest.approx(p1, rel=1e-12)
    assert pos.item() != pytest.approx(seq.item())
