"""Each preference loss on a fixed batch of log-probabilities equals its published formula, written out here
with math on Python floats (TRL's definitions: slimtune/objectives/losses.py names each)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from slimtune import objectives
from slimtune.objectives import Logps, losses

PC, PR = [-12.0, -30.5, -7.25], [-14.0, -28.0, -9.5]  # policy: summed answer log-probabilities
RC, RR = [-12.5, -29.0, -8.0], [-13.0, -29.5, -9.0]  # reference
NC, NR = [4, 10, 3], [5, 9, 3]  # answer tokens


def _lp(label=None) -> Logps:
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    return Logps(t(PC), t(PR), t(NC), t(NR), t(RC), t(RR),
                 None if label is None else torch.tensor(label))


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _close(a, b, tol=1e-6):
    assert abs(float(a) - b) < tol, (float(a), b)


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_dpo_and_cdpo(ls):
    beta = 0.1
    loss, m = losses.dpo(_lp(), beta, ls)
    per = []
    for pc, pr, rc, rr in zip(PC, PR, RC, RR):
        h = (pc - rc) - (pr - rr)
        per.append(-(1 - ls) * _logsig(beta * h) - ls * _logsig(-beta * h))
    _close(loss, sum(per) / 3)
    _close(m["rewards/chosen"].mean(), sum(beta * (pc - rc) for pc, rc in zip(PC, RC)) / 3)
    margins = [beta * ((pc - rc) - (pr - rr)) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]
    _close(m["rewards/margins"].mean(), sum(margins) / 3)
    assert m["rewards/accuracy"].tolist() == [1.0, 0.0, 1.0]  # margins 0.15, -0.3, 0.125
    _close(m["logps/rejected"].mean(), sum(PR) / 3)


def test_ipo_on_length_averaged_logps():
    beta = 0.25
    loss, _ = losses.ipo(_lp(), beta)
    per = [((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
           for pc, pr, rc, rr, nc, nr in zip(PC, PR, RC, RR, NC, NR)]
    _close(loss, sum(per) / 3)


def test_simpo_margin_is_beta_times_the_ratio():
    beta, ratio = 2.0, 0.5
    loss, m = losses.simpo(_lp(), beta, ratio)
    per = [-_logsig(beta * (pc / nc - pr / nr) - beta * ratio) for pc, pr, nc, nr in zip(PC, PR, NC, NR)]
    _close(loss, sum(per) / 3)
    # TRL's CPOTrainer(loss_type="simpo") with simpo_gamma = ratio x beta gives the same loss
    trl = [-_logsig(beta * ((pc / nc - pr / nr) - (ratio * beta) / beta)) for pc, pr, nc, nr in zip(PC, PR, NC, NR)]
    _close(loss, sum(trl) / 3)
    _close(m["rewards/chosen"].mean(), sum(beta * pc / nc for pc, nc in zip(PC, NC)) / 3)


def test_orpo_sft_plus_lambda_odds_ratio():
    lam = 0.1
    loss, m = losses.orpo(_lp(), lam)
    nll = -sum(PC) / sum(NC)
    ratios = []
    for pc, pr, nc, nr in zip(PC, PR, NC, NR):
        c, r = pc / nc, pr / nr
        log_odds = (c - r) - (math.log1p(-math.exp(c)) - math.log1p(-math.exp(r)))
        ratios.append(_logsig(log_odds))
    _close(loss, nll - lam * sum(ratios) / 3)
    _close(m["sft_loss"].mean(), nll)
    _close(m["odds_ratio_loss"].mean(), -sum(ratios) / 3)


def test_kto_with_the_mismatched_kl_estimate():
    beta, wd, wu = 0.1, 1.0, 1.5
    label = [True, False, True]
    loss, m = losses.kto(_lp(label), beta, wd, wu)
    # `rejected` holds each prompt with another record's answer: the KL estimate's pairs
    kl = max(0.0, sum(pr - rr for pr, rr in zip(PR, RR)) / 3)
    per = []
    for pc, rc, good in zip(PC, RC, label):
        r = pc - rc
        per.append(wd * (1 - 1 / (1 + math.exp(-beta * (r - kl)))) if good
                   else wu * (1 - 1 / (1 + math.exp(-beta * (kl - r)))))
    _close(loss, sum(per) / 3)
    _close(m["kl"][0], kl)
    assert m["rewards/chosen"].numel() == 2 and m["rewards/rejected"].numel() == 1


def test_kto_kl_is_clamped_at_zero():
    lp = _lp([True, True, False])
    lp.ref_rejected = lp.rejected + 1.0  # the policy's mismatched answers are less likely: a negative estimate
    _, m = losses.kto(lp, 0.1)
    assert float(m["kl"][0]) == 0.0


def test_registry_reads_the_config_knobs():
    pref = SimpleNamespace(beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, orpo_lambda=0.1,
                           kto_desirable_weight=1.0, kto_undesirable_weight=1.0)
    loss, _ = objectives.loss("dpo", _lp(), pref)
    _close(loss, float(losses.dpo(_lp(), 0.1)[0]))
    with pytest.raises(ValueError, match="not a preference objective"):
        objectives.loss("sft", _lp(), pref)
