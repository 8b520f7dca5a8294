"""Membership inference: the scores against independent oracles, the splits, and the attacks on
real overfit and DP-trained models (small MNIST subsets, a few seconds each)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedcrypt.audit.membership import (
    MembershipReport,
    ShadowModelAttack,
    attack_auc,
    audit_membership,
    evaluate_attack,
    membership_advantage,
    membership_splits,
    null_auc_stderr,
    without_dp,
)
from fedcrypt.config.job import JobConfig, parse_job
from fedcrypt.data import Dataset, load_dataset
from fedcrypt.simulation import partition_clients


def _overfit_job(**sections: dict[str, Any]) -> JobConfig:
    """An MLP that memorizes 300 MNIST examples (2 clients, 3 rounds of 20 local epochs)."""
    raw: dict[str, Any] = {
        "job": {"name": "mia-test", "rounds": 3, "seed": 0},
        "data": {"dataset": "mnist", "num_clients": 2, "train_samples": 300},
        "model": {"name": "mlp", "hidden": [128]},
        "train": {"local_epochs": 20, "batch_size": 16, "lr": 0.05, "momentum": 0.9},
        "strategy": {"weighting": "uniform"},
    }
    raw.update(sections)
    return parse_job(raw)


@pytest.fixture(scope="module")
def overfit_report() -> MembershipReport:
    return audit_membership(_overfit_job(), members=300, shadow_models=2)


@pytest.fixture(scope="module")
def dp_report() -> MembershipReport:
    # epsilon 0.5 over 3 rounds of 2 clients: noise far above any client's clipped update
    return audit_membership(_overfit_job(dp={"target_epsilon": 0.5}), members=300, shadow_models=2)


# --- scores against oracles --------------------------------------------------------------------


def _pairwise_auc(members: np.ndarray, others: np.ndarray) -> float:
    """P(member > non-member) + P(tie) / 2, over every pair."""
    diff = members[:, None] - others[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def _threshold_advantage(members: np.ndarray, others: np.ndarray) -> float:
    """max over every threshold t of P(member >= t) - P(non-member >= t)."""
    thresholds = np.concatenate([members, others, [np.inf]])
    return max(float((members >= t).mean() - (others >= t).mean()) for t in thresholds)


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_advantage_match_independent_oracles(seed: int) -> None:
    rng = np.random.default_rng(seed)
    members = np.round(rng.normal(0.4, 1.0, 150), 1)  # rounded: ties between the groups too
    others = np.round(rng.normal(0.0, 1.0, 170), 1)
    truth = np.r_[np.ones(150), np.zeros(170)]
    auc = attack_auc(members, others)
    assert auc == pytest.approx(roc_auc_score(truth, np.r_[members, others]), abs=1e-12)
    assert auc == pytest.approx(_pairwise_auc(members, others), abs=1e-12)
    assert membership_advantage(members, others) == pytest.approx(_threshold_advantage(members, others), abs=1e-12)


def test_advantage_on_constructed_scores() -> None:
    separable = evaluate_attack([5.0, 6.0, 7.0], [1.0, 2.0, 3.0, 4.0])
    assert (separable.auc, separable.advantage) == (1.0, 1.0)
    inverted = evaluate_attack([1.0, 2.0], [5.0, 6.0])  # worse than chance: no threshold gains anything
    assert (inverted.auc, inverted.advantage) == (0.0, 0.0)
    same = np.linspace(0, 1, 101)
    identical = evaluate_attack(same, same)
    assert (identical.auc, identical.advantage) == (0.5, 0.0)
    rng = np.random.default_rng(0)
    alike = evaluate_attack(rng.normal(size=20_000), rng.normal(size=20_000))  # one distribution
    assert abs(alike.auc - 0.5) < 0.01 and alike.advantage < 0.03
    # members shifted by one standard deviation: AUC = Phi(1 / sqrt 2), advantage = 2 Phi(1/2) - 1
    shifted = evaluate_attack(rng.normal(1.0, 1.0, 20_000), rng.normal(0.0, 1.0, 20_000))
    assert shifted.auc == pytest.approx(0.7602, abs=0.01) and shifted.advantage == pytest.approx(0.3829, abs=0.02)


def test_scores_must_be_finite_and_both_groups_present() -> None:
    with pytest.raises(ValueError, match="finite"):
        attack_auc([0.1, np.nan], [0.2])
    with pytest.raises(ValueError, match="got 0 and 2"):
        membership_advantage([], [0.1, 0.2])


def test_null_stderr_is_the_spread_of_auc_without_leakage() -> None:
    assert null_auc_stderr(300, 300) == pytest.approx(np.sqrt(601 / (12 * 300 * 300)))
    rng = np.random.default_rng(1)
    aucs = [attack_auc(rng.normal(size=60), rng.normal(size=40)) for _ in range(800)]
    assert np.std(aucs) == pytest.approx(null_auc_stderr(60, 40), rel=0.12)
    assert abs(np.mean(aucs) - 0.5) < 0.01


def test_shadow_attack_needs_fitting_and_enough_data() -> None:
    attack = ShadowModelAttack(1)
    with pytest.raises(RuntimeError, match="fit"):
        attack.score_samples(None, np.zeros((1, 2)), np.zeros(1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot give 6 in and 6 out"):
        attack.fit(lambda x, y, seed: None, np.zeros((10, 2)), np.zeros(10), 6)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="shadow_models must be >= 1"):
        ShadowModelAttack(0)


# --- splits ----------------------------------------------------------------------------------


def test_splits_are_disjoint_label_matched_and_deterministic(mnist: Dataset) -> None:
    job = _overfit_job()
    splits = membership_splits(job, mnist, members=200, shadow_models=3)
    trained = np.concatenate(partition_clients(job, mnist))
    assert len(splits.members) == 200 and len(np.unique(splits.members)) == 200
    assert np.isin(splits.members, trained).all()  # members: examples the job really trains on
    assert not np.isin(splits.shadow_train, trained).any()  # shadow: training examples it never sees
    assert not np.isin(splits.shadow_test, splits.nonmembers).any()  # ... and test examples not attacked
    assert len(splits.nonmembers) == 200 and len(np.unique(splits.nonmembers)) == 200
    assert np.array_equal(np.bincount(mnist.y_train[splits.members], minlength=10),
                          np.bincount(mnist.y_test[splits.nonmembers], minlength=10))
    assert splits.shadow_in == 300 and splits.shadow_pool == 2 * 300 * 3
    assert len(splits.shadow_train) > 0 and len(splits.shadow_test) > 0  # drawn from both
    again = membership_splits(job, mnist, members=200, shadow_models=3)
    assert all(np.array_equal(getattr(splits, k), getattr(again, k))
               for k in ("members", "nonmembers", "shadow_train", "shadow_test"))
    counts = splits.to_json()
    assert counts["members"] == counts["nonmembers"] == 200 and counts["trained_on"] == 300


def test_without_train_samples_shadow_data_comes_from_the_test_set() -> None:
    digits = load_dataset("digits")
    job = parse_job({"data": {"dataset": "digits", "num_clients": 2}})
    splits = membership_splits(job, digits, members=100, shadow_models=1)
    assert len(splits.shadow_train) == 0 and splits.trained_on == len(digits.y_train)
    assert splits.shadow_in == (360 - 100) // 2 and len(splits.shadow_test) == 2 * splits.shadow_in


@pytest.mark.parametrize(
    ("members", "message"),
    [
        (1000, "digits: the test set has 360 examples, too few for 1000 non-members plus 2 x 50 shadow examples"),
        (300, "digits: the test set has 360 examples, too few for 300 non-members plus 2 x 50 shadow examples"),
    ],
)
def test_a_test_set_too_small_for_the_split_is_a_one_line_error(members: int, message: str) -> None:
    job = parse_job({"data": {"dataset": "digits", "num_clients": 2}})
    with pytest.raises(ValueError) as info:
        audit_membership(job, members=members)  # fails before any training
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


# --- the attacks on trained models -----------------------------------------------------------


def test_an_overfit_model_gives_its_members_away(overfit_report: MembershipReport) -> None:
    (row,) = overfit_report.rows
    assert row.label == "as configured (no DP)" and row.epsilon is None
    assert row.train_accuracy >= 0.99 and 0.7 < row.test_accuracy < 0.95  # memorized, and a generalization gap
    assert row.loss_auc > 0.62 and row.loss_advantage > 0.2
    assert row.shadow_auc > 0.6 and row.shadow_advantage > 0.15
    assert "[dp]" in overfit_report.note
    assert overfit_report.splits["members"] == 300 and overfit_report.splits["shadow_in"] == 300


def test_strong_dp_hides_membership(dp_report: MembershipReport, overfit_report: MembershipReport) -> None:
    dp_row, plain = dp_report.rows
    assert dp_row.label == "as configured (DP eps=0.5)" and plain.label == "without DP"
    assert dp_row.epsilon is not None and dp_row.epsilon <= 0.5 and plain.epsilon is None
    assert abs(dp_row.loss_auc - 0.5) < 0.1 and abs(dp_row.shadow_auc - 0.5) < 0.1  # ~4 standard errors
    assert dp_row.loss_advantage < 0.2 and dp_row.shadow_advantage < 0.2
    # the comparison row is the job without [dp], which is deterministic: the plain audit's row
    alone = overfit_report.rows[0]
    assert (plain.loss_auc, plain.test_accuracy) == (alone.loss_auc, alone.test_accuracy)
    assert dp_report.note == ""


def test_the_report_is_json(dp_report: MembershipReport) -> None:
    data = json.loads(json.dumps(dp_report.to_json()))
    assert data["job"] == "mia-test" and data["dataset"] == "mnist" and data["model"] == "mlp"
    assert [r["label"] for r in data["rows"]] == ["as configured (DP eps=0.5)", "without DP"]
    assert set(data["rows"][0]) >= {"label", "epsilon", "test_accuracy", "train_accuracy", "loss_auc", "loss_advantage",
                                    "shadow_auc", "shadow_advantage", "seconds"}
    assert data["auc_stderr"] == pytest.approx(null_auc_stderr(300, 300))
    assert all(r["seconds"] > 0 for r in data["rows"]) and data["seconds"] >= sum(r["seconds"] for r in data["rows"])


def test_without_dp_drops_only_the_dp_section() -> None:
    job = _overfit_job(dp={"target_epsilon": 8})
    plain = without_dp(job)
    assert plain.dp is None and plain.strategy.weighting == "uniform"
    assert plain.model_dump(exclude={"dp"}) == job.model_dump(exclude={"dp"})
