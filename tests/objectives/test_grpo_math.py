"""GRPO's advantages and clipped loss against the formulas written out here, element by element in plain Python
(TRL 1.15's GRPOTrainer: `_compute_advantages` / `_compute_loss`), within 1e-6 on fixed tensors."""
from __future__ import annotations

import math

import pytest
import torch

from slimtune.config.fields import GrpoConfig
from slimtune.engine.grpo_step import advantages as kept_advantages, reward_metrics
from slimtune.objectives.rewards import Scored
from slimtune.objectives import grpo

REWARDS = [1.0, 0.0, 0.5, 0.25, 2.0, 2.0, 2.0, 2.0, -1.0, 3.0, 0.0, 1.0]  # 3 groups of 4; the second all equal
G = 4


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: list[float]) -> float:  # unbiased, as torch.std and TRL
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _expected_adv(scale: str) -> list[float]:
    out = []
    for g in range(len(REWARDS) // G):
        xs = REWARDS[g * G:(g + 1) * G]
        for x in xs:
            centred = x - _mean(xs)
            std = {"group": _std(xs), "batch": _std(REWARDS), "none": None}[scale]
            out.append(centred if std is None else centred / (std + 1e-4))
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_the_formula(scale):
    got = grpo.advantages(torch.tensor(REWARDS), G, scale)
    assert got.tolist() == pytest.approx(_expected_adv(scale), abs=1e-6)


def test_a_group_of_equal_rewards_gets_zero_advantage_and_counts_in_the_zero_std_share():
    got = grpo.advantages(torch.tensor(REWARDS), G, "group")
    assert got[G:2 * G].tolist() == [0.0] * G
    assert grpo.zero_variance_share(torch.tensor(REWARDS), G) == pytest.approx(1 / 3)


def test_a_completion_whose_reward_failed_is_left_out_of_its_group_and_the_step():
    """As TRL: the failed completion (NaN) gets advantage 0, its group's mean and std are those of the others."""
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    rewards[9] = math.nan  # the third group's second completion
    valid = [x for i, x in enumerate(REWARDS) if i != 9]
    for scale in ("group", "batch", "none"):
        adv, kept = kept_advantages(rewards, G, scale)
        assert kept.tolist() == [1] * 9 + [0] + [1] * 2 and adv[9] == 0.0
        third = [-1.0, 0.0, 1.0]  # the group's scored rewards
        std = {"group": _std(third), "batch": _std(valid), "none": None}[scale]
        want = [(x - _mean(third)) / (std + 1e-4) if std else x - _mean(third) for x in third]
        assert [adv[8].item(), adv[10].item(), adv[11].item()] == pytest.approx(want, abs=1e-6)
        first = _expected_adv(scale)[:4] if scale != "batch" else \
            [(x - _mean(REWARDS[:4])) / (_std(valid) + 1e-4) for x in REWARDS[:4]]
        assert adv[:4].tolist() == pytest.approx(first, abs=1e-6)
    every = kept_advantages(torch.tensor(REWARDS), G, "group")  # nothing failed: the plain formula
    assert every[0].tolist() == pytest.approx(_expected_adv("group"), abs=1e-6) and every[1].tolist() == [1] * 12


def test_the_logged_reward_numbers_are_trls():
    total = torch.tensor(REWARDS, dtype=torch.float64)
    total[9] = math.nan
    per = {"a": total.clone(), "b": torch.ones(12, dtype=torch.float64)}
    lengths = [1, 5, 3, 5, 2, 2, 2, 2, 4, 4, 4, 4]
    m = reward_metrics([Scored(total, per, 1)], total, (~torch.isnan(total)).long(), lengths,
                       GrpoConfig(num_generations=G, max_new_tokens=5))
    valid = [x for i, x in enumerate(REWARDS) if i != 9]
    assert m["reward"] == pytest.approx(_mean(valid)) and m["reward_std"] == pytest.approx(_std(valid))
    assert m["frac_reward_zero_std"] == pytest.approx(1 / 3)  # the second group's rewards are all 2.0
    assert m["rewards/a/mean"] == pytest.approx(_mean(valid)) and m["rewards/b/std"] == 0.0
    assert m["completion_length"] == pytest.approx(38 / 12) and m["completions_clipped"] == pytest.approx(2 / 12)
    assert m["reward_failures"] == 1


def test_rewards_that_do_not_split_into_groups_are_refused():
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        grpo.advantages(torch.zeros(6), 4)


# two sequences of 4 completion tokens; the second's last two are padding
LOGPS = [[-1.0, -0.5, -2.0, -0.1], [-0.3, -1.2, -0.7, -0.9]]
OLD = [[-1.1, -0.2, -2.0, -0.4], [-0.3, -1.5, -0.2, -0.9]]
REF = [[-0.9, -0.6, -1.5, -0.2], [-0.4, -1.0, -0.8, -1.0]]
MASK = [[1, 1, 1, 1], [1, 1, 0, 0]]
ADV = [0.8, -1.3]


def _per_token(i: int, t: int, eps_low: float, eps_high: float, beta: float) -> float:
    ratio = math.exp(LOGPS[i][t] - OLD[i][t])
    clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
    loss = -min(ratio * ADV[i], clipped * ADV[i])
    if beta:
        d = REF[i][t] - LOGPS[i][t]
        loss += beta * (math.exp(d) - d - 1)
    return loss


def _expected_loss(loss_type: str, beta: float, eps_high: float, max_new: int) -> float:
    rows = [[_per_token(i, t, 0.2, eps_high, beta) * MASK[i][t] for t in range(4)] for i in range(2)]
    if loss_type == "grpo":
        return _mean([sum(r) / sum(m) for r, m in zip(rows, MASK)])
    if loss_type == "dr_grpo":
        return sum(map(sum, rows)) / (2 * max_new)
    return sum(map(sum, rows)) / sum(map(sum, MASK))  # dapo: every completion token of the step


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,eps_high", [(0.0, 0.2), (0.04, 0.28)])
def test_each_loss_normalisation_matches_the_formula(loss_type, beta, eps_high):
    cfg = grpo.LossConfig(loss_type, 0.2, eps_high, beta, max_new_tokens=6)
    parts = grpo.policy_loss(torch.tensor(LOGPS), torch.tensor(OLD), torch.tensor(ADV), torch.tensor(MASK), cfg,
                             torch.tensor(REF) if beta else None)
    assert float(parts.loss) == pytest.approx(_expected_loss(loss_type, beta, eps_high, 6), abs=1e-6)
    assert parts.tokens == 6


def test_micro_batch_losses_with_the_step_counts_sum_to_the_whole_step_loss():
    cfg = grpo.LossConfig("dapo", 0.2, 0.28, 0.0)
    whole = grpo.policy_loss(torch.tensor(LOGPS), torch.tensor(OLD), torch.tensor(ADV), torch.tensor(MASK), cfg)
    halves = [grpo.policy_loss(torch.tensor(LOGPS[i:i + 1]), torch.tensor(OLD[i:i + 1]), torch.tensor(ADV[i:i + 1]),
                               torch.tensor(MASK[i:i + 1]), cfg, step_tokens=6, step_sequences=2) for i in range(2)]
    assert float(sum(h.loss for h in halves)) == pytest.approx(float(whole.loss), abs=1e-6)


def test_clip_ratio_counts_the_tokens_where_the_clip_changes_the_loss():
    cfg = grpo.LossConfig("dapo", 0.2, 0.2, 0.0)
    parts = grpo.policy_loss(torch.tensor(LOGPS), torch.tensor(OLD), torch.tensor(ADV), torch.tensor(MASK), cfg)
    # high clip where A > 0 (row 0): ratios exp(0.1), exp(-0.3), 1, exp(0.3) -> only exp(0.3) = 1.35 > 1.2;
    # low clip where A < 0 (row 1, kept tokens): exp(0), exp(0.3) -> none below 0.8
    assert parts.clipped == pytest.approx(1 / 6, abs=1e-6)
    beta = grpo.LossConfig("dapo", 0.2, 0.2, 0.1)
    with_kl = grpo.policy_loss(torch.tensor(LOGPS), torch.tensor(OLD), torch.tensor(ADV), torch.tensor(MASK), beta,
                               torch.tensor(REF))
    want = _mean([math.exp(REF[i][t] - LOGPS[i][t]) - (REF[i][t] - LOGPS[i][t]) - 1
                  for i in range(2) for t in range(4) if MASK[i][t]])
    assert with_kl.kl == pytest.approx(want, abs=1e-6)
