"""Membership inference against a job's final global model: how much does the model say about
whether one example was in its training data?

Two attacks, both scored as a ranking of members above non-members (ROC AUC; 0.5 = the attacker
learns nothing) and as the membership advantage ``max over thresholds of TPR - FPR`` (Yeom et al.
2018; 0 = nothing, 1 = every example classified right):

* **loss threshold** (Yeom et al. 2018): an example whose loss under the model is low is guessed
  to be a member. It needs nothing but the model and the labelled example, and is the attack that
  overfitting feeds directly.
* **shadow models** (Shokri et al. 2017): the attacker trains models like the target on data of
  its own whose membership it knows, learns from their outputs (sorted probabilities, true-class
  probability, loss) what a member looks like, and applies that classifier to the target.

:func:`audit_membership` trains a job's final model exactly as the job says (its mechanism,
strategy and DP), attacks it, and, for a job with a ``[dp]`` section, does the same for the job
without DP, so the report shows what DP buys.

The audit's random choices (which examples are attacked, the shadow splits) use NumPy
generators seeded from the job seed: simulation randomness, not key material.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from fedcrypt.config.job import JobConfig, parse_job
from fedcrypt.core.params import load_flat
from fedcrypt.core.server import RoundRecord
from fedcrypt.data import Dataset, load_dataset, partition
from fedcrypt.models.training import ClientData
from fedcrypt.simulation import build_server, build_trainer, client_names, partition_clients, simulate

log = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor

MIN_SHADOW = 50
"""A shadow model trains on at least this many examples (or on as many as the target, if fewer)."""

_SPLIT_STREAM = 0x6D656D62  # "memb": tags the audit's own random stream (not the job's)


class _Classifier(Protocol):
    def fit(self, x: np.ndarray, y: np.ndarray) -> Any: ...

    def predict_proba(self, x: np.ndarray) -> np.ndarray: ...


# --- what an attacker sees of the model ------------------------------------------------------


@torch.no_grad()
def predict_log_proba(model: nn.Module, x: ArrayLike, *, batch_size: int = 1024) -> np.ndarray:
    """The model's log-probabilities (log-softmax, float64, shape ``(n, classes)``) in eval mode.

    Log-probabilities rather than probabilities: a well-fit model gives members probabilities
    that round to 1.0 in float32, and the attacks need the difference.
    """
    inputs = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.require(x, requirements="W"))
    was_training = model.training
    model.eval()
    try:
        out = [
            torch.log_softmax(model(batch).double(), dim=1)
            for batch in inputs.split(batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.empty((0, 0))


def _labels(y: ArrayLike, n: int) -> np.ndarray:
    labels = np.asarray(y.numpy() if isinstance(y, torch.Tensor) else y).astype(np.int64)
    if labels.shape != (n,):
        raise ValueError(f"expected {n} labels, got shape {labels.shape}")
    return labels


def example_losses(model: nn.Module, x: ArrayLike, y: ArrayLike) -> np.ndarray:
    """Per-example cross-entropy loss of ``model`` on ``(x, y)``."""
    log_proba = predict_log_proba(model, x)
    labels = _labels(y, len(log_proba))
    return -log_proba[np.arange(len(labels)), labels]


def membership_scores(model: nn.Module, x: ArrayLike, y: ArrayLike) -> np.ndarray:
    """The loss-threshold attack's score: ``-loss`` per example (higher = more likely a member)."""
    return -example_losses(model, x, y)


def attack_features(model: nn.Module, x: ArrayLike, y: ArrayLike, *, top_k: int = 3) -> np.ndarray:
    """Class-agnostic features of the model's output per example (shadow-model attack input).

    Columns: the ``top_k`` largest log-probabilities (sorted, so the features do not depend on
    which class), the true class's log-probability (= -loss), whether the prediction is right,
    and the margin of the true class over the best other class.
    """
    log_proba = predict_log_proba(model, x)
    n, classes = log_proba.shape
    labels = _labels(y, n)
    k = min(top_k, classes)
    ranked = -np.sort(-log_proba, axis=1)[:, :k]
    true = log_proba[np.arange(n), labels]
    others = log_proba.copy()
    others[np.arange(n), labels] = -np.inf
    best_other = others.max(axis=1)
    correct = (log_proba.argmax(axis=1) == labels).astype(np.float64)
    return np.column_stack([ranked, true, correct, true - best_other])


# --- scoring an attack -------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackResult:
    """How well an attack separates members from non-members."""

    auc: float  # ROC AUC: P(a random member scores above a random non-member); 0.5 = chance
    advantage: float  # max over thresholds of TPR - FPR (Yeom et al.'s membership advantage)


def _scores_and_truth(member_scores: ArrayLike, nonmember_scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    members = np.asarray(member_scores, dtype=np.float64).ravel()
    others = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if not len(members) or not len(others):
        raise ValueError(f"need members and non-members to score an attack, got {len(members)} and {len(others)}")
    scores = np.concatenate([members, others])
    if not np.isfinite(scores).all():
        raise ValueError("attack scores must be finite (did the model's training diverge?)")
    truth = np.concatenate([np.ones(len(members)), np.zeros(len(others))])
    return truth, scores


def attack_auc(member_scores: ArrayLike, nonmember_scores: ArrayLike) -> float:
    """ROC AUC of scores that should be higher for members (0.5: no better than a coin)."""
    truth, scores = _scores_and_truth(member_scores, nonmember_scores)
    return float(roc_auc_score(truth, scores))


def membership_advantage(member_scores: ArrayLike, nonmember_scores: ArrayLike) -> float:
    """``max over thresholds of TPR - FPR``: the attack's best gain over guessing (0 to 1)."""
    truth, scores = _scores_and_truth(member_scores, nonmember_scores)
    fpr, tpr, _ = roc_curve(truth, scores)
    return float(max(0.0, np.max(tpr - fpr)))


def null_auc_stderr(members: int, nonmembers: int) -> float:
    """The standard error of the AUC of an attack that learns nothing, for these sample sizes
    (Mann-Whitney: ``sqrt((m + n + 1) / (12 m n))``): the yardstick for "within 0.05 of 0.5"."""
    if members < 1 or nonmembers < 1:
        raise ValueError(f"need members and non-members, got {members} and {nonmembers}")
    return math.sqrt((members + nonmembers + 1) / (12 * members * nonmembers))


def evaluate_attack(member_scores: ArrayLike, nonmember_scores: ArrayLike) -> AttackResult:
    """AUC and advantage of one attack's scores."""
    return AttackResult(
        attack_auc(member_scores, nonmember_scores), membership_advantage(member_scores, nonmember_scores)
    )


# --- the attacks ------------------------------------------------------------------------------


class LossThresholdAttack:
    """Yeom et al. (2018): members have lower loss. Scores are ``-loss``; the AUC and advantage
    sweep every threshold, so no threshold has to be chosen (the advantage is the best one's)."""

    def score_samples(self, model: nn.Module, x: ArrayLike, y: ArrayLike) -> np.ndarray:
        return membership_scores(model, x, y)

    def evaluate(
        self, model: nn.Module, members: tuple[ArrayLike, ArrayLike], nonmembers: tuple[ArrayLike, ArrayLike]
    ) -> AttackResult:
        return evaluate_attack(self.score_samples(model, *members), self.score_samples(model, *nonmembers))


ShadowTrainer = Callable[[np.ndarray, np.ndarray, int], nn.Module]
"""Trains one shadow model: ``(x_in, y_in, seed) -> model`` (as the target was trained)."""


class ShadowModelAttack:
    """Shokri et al. (2017), with one class-agnostic attack classifier (as Salem et al. 2019).

    :meth:`fit` trains ``shadow_models`` models with ``train_shadow`` on the attacker's own data:
    each takes ``2 * in_size`` examples (disjoint from the other shadows' while the data lasts),
    trains on half ("in") and keeps the other half "out";
    the features (:func:`attack_features`) of both halves label an attack classifier (default:
    logistic regression on standardized features, which needs little data and extrapolates
    monotonically; any scikit-learn classifier can be given) that :meth:`score_samples` applies
    to any model.
    """

    def __init__(
        self,
        shadow_models: int = 2,
        *,
        top_k: int = 3,
        classifier: _Classifier | None = None,
        seed: int = 0,
    ) -> None:
        if shadow_models < 1:
            raise ValueError(f"shadow_models must be >= 1, got {shadow_models}")
        self.shadow_models = shadow_models
        self.top_k = top_k
        self.classifier = classifier
        self.seed = seed
        self.classifier_: _Classifier | None = None
        self.shadow_results_: list[AttackResult] = []  # each shadow's own in/out, by the loss attack

    def fit(self, train_shadow: ShadowTrainer, x: np.ndarray, y: np.ndarray, in_size: int) -> ShadowModelAttack:
        """Train the shadow models on ``(x, y)`` (disjoint from anything the target's audit
        scores) and the attack classifier on their members and non-members."""
        if not 1 <= in_size <= len(x) // 2:
            raise ValueError(f"shadow data of {len(x)} examples cannot give {in_size} in and {in_size} out")
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(x))
        features, truth = [], []
        self.shadow_results_ = []
        for k in range(self.shadow_models):
            if 2 * in_size * (k + 1) <= len(x):
                chosen = order[2 * in_size * k : 2 * in_size * (k + 1)]
            else:  # the data is used up: a fresh draw, overlapping earlier shadows (as Shokri et al. allow)
                chosen = rng.permutation(len(x))[: 2 * in_size]
            inside, outside = chosen[:in_size], chosen[in_size:]
            model = train_shadow(x[inside], y[inside], int(rng.integers(2**31)))
            f_in = attack_features(model, x[inside], y[inside], top_k=self.top_k)
            f_out = attack_features(model, x[outside], y[outside], top_k=self.top_k)
            true_class = f_in.shape[1] - 3  # the true-class log-probability column
            self.shadow_results_.append(evaluate_attack(f_in[:, true_class], f_out[:, true_class]))
            log.info("shadow model %d/%d: loss-attack AUC %.3f on its own split",
                     k + 1, self.shadow_models, self.shadow_results_[-1].auc)
            features += [f_in, f_out]
            truth += [np.ones(len(f_in)), np.zeros(len(f_out))]
        if self.classifier is not None:
            classifier = clone(self.classifier)  # a fresh, unfitted copy: fit() may be called again
        else:
            classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        classifier.fit(np.concatenate(features), np.concatenate(truth))
        self.classifier_ = classifier
        return self

    def score_samples(self, model: nn.Module, x: ArrayLike, y: ArrayLike) -> np.ndarray:
        """The attack classifier's probability that each example is a member of ``model``'s data."""
        if self.classifier_ is None:
            raise RuntimeError("ShadowModelAttack: call fit() first")
        return self.classifier_.predict_proba(attack_features(model, x, y, top_k=self.top_k))[:, 1]

    def evaluate(
        self, model: nn.Module, members: tuple[ArrayLike, ArrayLike], nonmembers: tuple[ArrayLike, ArrayLike]
    ) -> AttackResult:
        return evaluate_attack(self.score_samples(model, *members), self.score_samples(model, *nonmembers))


def job_like_trainer(config: JobConfig, dataset: Dataset) -> ShadowTrainer:
    """A :data:`ShadowTrainer` that trains as ``config`` does, in the clear and without DP.

    The shadow data is split over the job's clients with the job's partitioner, and the job's
    strategy runs its rounds through the same in-process server as a simulation, without any
    protection mechanism: protection does not change the sum, and DP noise is something the
    attacker cannot reproduce, so the attacker imitates the plain job. The model is the job's
    architecture, initialized from the shadow's own seed.
    """
    plain = config.in_the_clear()

    def train_shadow(x: np.ndarray, y: np.ndarray, seed: int) -> nn.Module:
        clients = min(config.data.num_clients, len(y))
        job = plain.with_overrides(
            job={"seed": seed},
            data={"num_clients": clients, "train_samples": None},
            strategy={"min_fit_clients": min(config.strategy.min_fit_clients, clients)},
        )
        with torch.random.fork_rng(devices=[]):
            trainer = build_trainer(job, dataset)
        parts = partition(y, clients, job.data.partition, seed=seed, alpha=job.data.alpha,
                          shards_per_client=job.data.shards_per_client)
        xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
        data = {name: ClientData(xt, yt, torch.from_numpy(part)) for name, part in zip(client_names(clients), parts)}
        server = build_server(job, trainer, data)
        for server_round in range(1, job.job.rounds + 1):
            server.run_round(server_round)
        server.shutdown()
        load_flat(trainer.model, server.params, trainer.spec)
        return trainer.model

    return train_shadow


# --- which examples play which part ------------------------------------------------------------


@dataclass(frozen=True)
class MembershipSplits:
    """Disjoint example sets of one audit (indices into the dataset's train or test arrays)."""

    members: np.ndarray  # train indices the job trained on (a sample of them)
    nonmembers: np.ndarray  # test indices, as many as members and with their label counts
    shadow_train: np.ndarray  # shadow data: train indices the job never uses (data.train_samples)
    shadow_test: np.ndarray  # shadow data: test indices that are not non-members
    trained_on: int  # how many examples the job trained on
    shadow_in: int  # examples each shadow model trains on (as many out)

    @property
    def shadow_pool(self) -> int:
        return len(self.shadow_train) + len(self.shadow_test)

    def to_json(self) -> dict[str, int]:
        return {
            "trained_on": self.trained_on,
            "members": len(self.members),
            "nonmembers": len(self.nonmembers),
            "shadow_pool": self.shadow_pool,
            "shadow_pool_from_train": len(self.shadow_train),
            "shadow_pool_from_test": len(self.shadow_test),
            "shadow_in": self.shadow_in,
            "shadow_out": self.shadow_in,
        }

    def shadow_data(self, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
        """The shadow pool's inputs and labels."""
        return (np.concatenate([dataset.x_train[self.shadow_train], dataset.x_test[self.shadow_test]]),
                np.concatenate([dataset.y_train[self.shadow_train], dataset.y_test[self.shadow_test]]))


def membership_splits(
    config: JobConfig, dataset: Dataset, members: int = 1000, shadow_models: int = 2
) -> MembershipSplits:
    """Members: up to ``members`` of the examples the job's clients train on. Non-members: as many
    test examples, with the same label counts. Shadow data: drawn from the other test examples
    and the training examples the job does not use (``data.train_samples``), enough for
    ``shadow_models`` disjoint in/out pairs where there is that much. Each shadow model trains on
    as many examples as the target (at least ``MIN_SHADOW``, or fewer if the target trained on
    fewer), so the test set must be large enough. All choices are seeded by the job seed.
    """
    if members < 1 or shadow_models < 1:
        raise ValueError(f"members and shadow_models must be >= 1, got {members} and {shadow_models}")
    trained = np.unique(np.concatenate(partition_clients(config, dataset)))
    unused = np.setdiff1d(np.arange(len(dataset.y_train)), trained, assume_unique=True)
    count = min(members, len(trained))
    n_test = len(dataset.y_test)
    shadow_in = min(len(trained), (n_test - count + len(unused)) // 2)
    needed = min(len(trained), MIN_SHADOW)
    if count > n_test or shadow_in < needed:
        raise ValueError(
            f"{dataset.name}: the test set has {n_test} examples, too few for {count} non-members plus "
            f"2 x {needed} shadow examples ({len(unused)} more come from unused training examples); "
            f"lower members or set data.train_samples"
        )
    rng = np.random.default_rng(np.random.SeedSequence([config.job.seed, _SPLIT_STREAM]))
    member_idx = np.sort(rng.choice(trained, size=count, replace=False))
    nonmembers = _same_labels(dataset.y_train[member_idx], dataset, rng)
    rest = np.setdiff1d(np.arange(n_test), nonmembers, assume_unique=True)
    # the pool: a random draw from unused training and remaining test examples, no larger than needed
    pool = rng.permutation(len(unused) + len(rest))[: 2 * shadow_in * shadow_models]
    shadow_train = np.sort(unused[pool[pool < len(unused)]])
    shadow_test = np.sort(rest[pool[pool >= len(unused)] - len(unused)])
    return MembershipSplits(member_idx, nonmembers, shadow_train, shadow_test, len(trained), shadow_in)


def _same_labels(member_labels: np.ndarray, dataset: Dataset, rng: np.random.Generator) -> np.ndarray:
    """Test indices with exactly the members' label counts (a random choice within each class).

    Matching the labels keeps the comparison about membership: a badly fit model's loss depends
    mostly on the class, so a different class mix alone would move the AUC away from 0.5.
    """
    chosen = []
    for label, wanted in zip(*np.unique(member_labels, return_counts=True)):
        candidates = np.flatnonzero(dataset.y_test == label)
        if len(candidates) < wanted:
            name = dataset.class_names[label] if 0 <= label < len(dataset.class_names) else label
            raise ValueError(
                f"{dataset.name}: the test set has {len(candidates)} examples of class {name!r}, fewer than "
                f"the {wanted} members of that class to match; lower members"
            )
        chosen.append(rng.choice(candidates, size=wanted, replace=False))
    return np.sort(np.concatenate(chosen))


# --- the audit -------------------------------------------------------------------------------


@dataclass
class MembershipRow:
    """One trained model's exposure: both attacks on the same members and non-members."""

    label: str
    epsilon: float | None  # the DP budget spent by the job (None: no DP)
    test_accuracy: float  # on the whole test set
    train_accuracy: float  # on the attacked members
    loss_auc: float
    loss_advantage: float
    shadow_auc: float
    shadow_advantage: float
    seconds: float  # training this model and attacking it
    rounds: int = 0  # rounds the job ran (DP can stop it early)
    stopped: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MembershipReport:
    """The audit of one job: a row per trained model (as configured, and without DP if it had DP)."""

    job: str
    dataset: str
    model: str
    mechanism: str
    splits: dict[str, int]
    shadow_models: int
    shadow_seconds: float  # training the shadow models and the attack classifier (shared by the rows)
    auc_stderr: float  # standard error of the AUC of an attack that learns nothing (null_auc_stderr)
    rows: list[MembershipRow] = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable dict (e.g. for ``membership.json``)."""
        return {
            "attack": "membership-inference",
            "job": self.job,
            "dataset": self.dataset,
            "model": self.model,
            "mechanism": self.mechanism,
            "splits": dict(self.splits),
            "shadow_models": self.shadow_models,
            "shadow_seconds": self.shadow_seconds,
            "auc_stderr": self.auc_stderr,
            "rows": [row.to_json() for row in self.rows],
            "note": self.note,
            "seconds": self.seconds,
        }


def without_dp(config: JobConfig) -> JobConfig:
    """The same job with its ``[dp]`` section removed (``weighting`` is kept as it was)."""
    return parse_job({**config.model_dump(), "dp": None}, source="job without dp")


def audit_membership(
    config: JobConfig,
    *,
    data_dir: str | Path | None = None,
    members: int = 1000,
    shadow_models: int = 2,
    compare_without_dp: bool = True,
    progress: Callable[[str], None] | None = None,
) -> MembershipReport:
    """Train the job's final global model (:func:`fedcrypt.simulate`, exactly as configured) and
    attack it with the loss-threshold and shadow-model attacks; with a ``[dp]`` section and
    ``compare_without_dp``, also the same job without DP. Splits: see :func:`membership_splits`.
    """
    started = time.perf_counter()
    say = progress or (lambda message: None)
    dataset = load_dataset(config.data.dataset, data_dir or config.data.data_dir)
    splits = membership_splits(config, dataset, members, shadow_models)
    say(f"splits: {splits.to_json()}")

    x_member, y_member = dataset.x_train[splits.members], dataset.y_train[splits.members]
    x_non, y_non = dataset.x_test[splits.nonmembers], dataset.y_test[splits.nonmembers]
    x_shadow, y_shadow = splits.shadow_data(dataset)

    shadow_started = time.perf_counter()
    say(f"training {shadow_models} shadow model(s) on {splits.shadow_in} examples each")
    shadow = ShadowModelAttack(shadow_models, seed=config.job.seed).fit(
        job_like_trainer(config, dataset), x_shadow, y_shadow, splits.shadow_in
    )
    shadow_seconds = time.perf_counter() - shadow_started

    jobs: list[tuple[str, JobConfig]] = []
    if config.dp is not None:
        budget = config.dp.target_epsilon  # without one, the label shows the epsilon the job spent
        jobs.append((f"as configured (DP eps={budget:g})" if budget else "as configured (DP)", config))
        if compare_without_dp:
            jobs.append(("without DP", without_dp(config)))
        note = ""
    else:
        jobs.append(("as configured (no DP)", config))
        note = ('the job has no [dp] section: to see what DP buys, add one (e.g. target_epsilon = 8, '
                'with [strategy] weighting = "uniform") and audit again')

    rows = []
    for label, job in jobs:
        row_started = time.perf_counter()
        say(f"{label}: training {job.job.rounds} rounds")
        result = simulate(job, data_dir=data_dir, on_round=_round_reporter(say, label, job.job.rounds))
        trainer = build_trainer(job, dataset)
        load_flat(trainer.model, result.params, trainer.spec)
        model = trainer.model
        test_acc = _accuracy(model, dataset.x_test, dataset.y_test)
        train_acc = _accuracy(model, x_member, y_member)
        loss = LossThresholdAttack().evaluate(model, (x_member, y_member), (x_non, y_non))
        shadowed = shadow.evaluate(model, (x_member, y_member), (x_non, y_non))
        epsilon = _spent_epsilon(result.history) if job.dp is not None else None
        if job.dp is not None and job.dp.target_epsilon is None and epsilon is not None:
            label = f"as configured (DP eps={epsilon:.3g})"
        row = MembershipRow(
            label, epsilon, test_acc, train_acc, loss.auc, loss.advantage, shadowed.auc, shadowed.advantage,
            time.perf_counter() - row_started, len(result.history), result.stopped,
        )
        log.info("%s: test acc %.3f, member acc %.3f, loss AUC %.3f (adv %.3f), shadow AUC %.3f (adv %.3f)",
                 label, test_acc, train_acc, loss.auc, loss.advantage, shadowed.auc, shadowed.advantage)
        say(f"{label}: loss AUC {loss.auc:.3f}, shadow AUC {shadowed.auc:.3f}")
        rows.append(row)

    return MembershipReport(
        job=config.job.name,
        dataset=dataset.name,
        model=config.model.name,
        mechanism=config.privacy.mechanism,
        splits=splits.to_json(),
        shadow_models=shadow_models,
        shadow_seconds=shadow_seconds,
        auc_stderr=null_auc_stderr(len(splits.members), len(splits.nonmembers)),
        rows=rows,
        note=note,
        seconds=time.perf_counter() - started,
    )


def _round_reporter(say: Callable[[str], None], label: str, rounds: int) -> Callable[[RoundRecord], None]:
    def on_round(record: RoundRecord) -> None:
        say(f"{label}: round {record.round}/{rounds}, test accuracy {record.accuracy:.3f}")

    return on_round


def _accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    log_proba = predict_log_proba(model, x)
    return float((log_proba.argmax(axis=1) == y).mean()) if len(y) else math.nan


def _spent_epsilon(history: Sequence[RoundRecord]) -> float | None:
    """The epsilon the job's last round reports (the DP mechanism's accountant), if any."""
    for record in reversed(history):
        value = record.mechanism.get("dp_epsilon")
        if value is not None and math.isfinite(value):
            return float(value)
    return None
