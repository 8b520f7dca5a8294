"""The selective-encryption sweep: masks of the size asked for, shared end points, and PSNR that
goes from a working attack (nothing encrypted) to a guess (everything encrypted)."""

from __future__ import annotations

import numpy as np
import pytest

from fedcrypt.audit.leakage import RULES, selection_mask, selection_sweep
from fedcrypt.audit.observe import audit_batches, observe_round
from fedcrypt.mechanisms.selective import layer_mask


@pytest.fixture(scope="module")
def plain_round(lenet_job, mnist):
    return observe_round(lenet_job(), mnist, audit_batches(mnist, 2, 1, seed=0))


@pytest.mark.parametrize("rule", ["sensitivity", "magnitude", "random"])
def test_ratio_rules_encrypt_the_share_asked_for(plain_round, rule: str) -> None:
    parameters = plain_round.spec.size
    for ratio in (0.01, 0.1, 0.5):
        mask = selection_mask(rule, ratio, plain_round)
        assert mask.shape == (parameters + 1,) and mask[-1]  # the weight entry is always encrypted
        assert int(mask[:-1].sum()) == int(np.ceil(ratio * parameters))
    assert not selection_mask(rule, 0.0, plain_round)[:-1].any()


def test_magnitude_rule_takes_the_largest_entries(plain_round) -> None:
    mask = selection_mask("magnitude", 0.05, plain_round)[:-1]
    one = np.abs(plain_round.observations[0].view[:-1])
    two = np.abs(plain_round.observations[1].view[:-1])
    score = one / one.max() + two / two.max()
    assert score[mask].min() >= score[~mask].max()


def test_layer_rule_encrypts_whole_tensors_within_the_ratio(plain_round) -> None:
    for ratio in (0.05, 0.3, 0.6):
        mask = selection_mask("layer", ratio, plain_round)
        assert mask[:-1].mean() <= ratio
        tensors = plain_round.spec.tensors
        starts = np.cumsum([0] + [t.numel for t in tensors[:-1]])
        names = [t.name for t, start in zip(tensors, starts) if mask[start]]
        np.testing.assert_array_equal(mask, layer_mask(plain_round.spec, names))


def test_unknown_rule_is_refused(plain_round, lenet_job, mnist) -> None:
    with pytest.raises(ValueError, match="unknown selection rule 'biggest'"):
        selection_mask("biggest", 0.1, plain_round)
    with pytest.raises(ValueError, match="unknown selection rule 'biggest'"):
        selection_sweep(lenet_job(), mnist, rules=["biggest"])


def test_sweep_goes_from_a_working_attack_to_a_guess(lenet_job, mnist) -> None:
    points = selection_sweep(lenet_job(), mnist, rules=RULES, ratios=(0.0, 0.1, 1.0), clients=2, seed=0)
    assert [(p.rule, p.ratio) for p in points] == [(r, q) for r in RULES for q in (0.0, 0.1, 1.0)]
    for point in points:
        if point.ratio == 0.0:
            assert point.mean_psnr >= 30 and point.label_recovery == 1.0 and point.encrypted_fraction == 0.0
        elif point.ratio == 1.0:
            assert point.mean_psnr <= 12 and point.encrypted_fraction == 1.0
    ends = {p.ratio: p for p in points if p.rule == RULES[0]}
    assert all(p.mean_psnr == ends[p.ratio].mean_psnr for p in points if p.ratio in (0.0, 1.0))
