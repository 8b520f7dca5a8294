"""Selective CKKS (FedML-HE): mask agreement under encryption, split payloads, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedcrypt.core.mechanism import PayloadRejected, RecoveryError, RoundContext
from fedcrypt.core.messages import FitRes, Payload, StageIns, from_bytes, to_bytes
from fedcrypt.core.params import ParamSpec, TensorSpec
from fedcrypt.crypto.ckks import PRESETS, SecretKey
from fedcrypt.mechanisms.selective import (
    PROTECT_STAGE,
    SENSITIVITY_STAGE,
    SelectiveCkksMechanism,
    layer_mask,
    mask_digest,
    normalized,
    selected_count,
    sensitivity_mask,
)

SPEC = ParamSpec((TensorSpec("conv.weight", (40, 50), "float32"), TensorSpec("conv.bias", (40,), "float32"),
                  TensorSpec("fc.weight", (10, 300), "float32"), TensorSpec("bn.running_mean", (60,), "float32")))
SIZE = SPEC.size + 1
NAMES = ("a", "b", "c")


def _ctx(round_: int = 1, participants: tuple[str, ...] = NAMES) -> RoundContext:
    return RoundContext("job", round_, participants, SIZE)


class _FixedLocal:
    """A client's model as the mechanism sees it, with a known sensitivity map."""

    def __init__(self, scores: np.ndarray) -> None:
        self.scores = scores
        self.calls = 0

    def sensitivity(self) -> np.ndarray:
        self.calls += 1
        return self.scores


@pytest.fixture(scope="module")
def secret() -> SecretKey:
    return SecretKey(PRESETS["fast"])


def _wire(payload: Payload) -> Payload:
    message = from_bytes(to_bytes(FitRes(1, 1, {}, payload), job="job", sender="a")).message
    assert isinstance(message, FitRes)
    return message.payload


def _request(payload: Payload) -> Payload:
    message = from_bytes(to_bytes(StageIns(1, PROTECT_STAGE, payload), job="job", sender="server")).message
    assert isinstance(message, StageIns)
    return message.payload


def _scores(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scores = rng.exponential(size=SPEC.size).astype(np.float32) * rng.uniform(0.1, 10)
    scores[-60:] = np.inf  # the BatchNorm buffer: not a trainable parameter
    return scores


def _contributions(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.append(rng.uniform(-1, 1, SPEC.size), w).astype(np.float32) * np.float32(w)
            for w in rng.integers(1, 40, len(NAMES))]


def _round(server: SelectiveCkksMechanism, clients: dict[str, SelectiveCkksMechanism],
           contributions: list[np.ndarray], round_: int = 1) -> tuple[np.ndarray, tuple[str, ...]]:
    """Run one round through the wire; returns the sum a client recovers and the stages run."""
    ctx = _ctx(round_, tuple(clients))
    aggregator = server.server_round(ctx)
    protectors = {name: mech.client_round(ctx, name, _FixedLocal(_scores(i))) for i, (name, mech) in
                  enumerate(clients.items())}
    for stage in aggregator.stages:
        for (name, protector), vector in zip(protectors.items(), contributions):
            reply = protector.respond(stage, _request(aggregator.request(stage, name)), vector)
            aggregator.fold(stage, name, _wire(reply))
        aggregator.close_stage(stage, list(clients))
    assert all(p.done for p in protectors.values())
    first = next(iter(clients.values()))
    return first.recover(_wire(aggregator.finish()), ctx), aggregator.stages


def _pair(secret: SecretKey, ratio: float = 0.1, **kwargs: object) -> tuple[SelectiveCkksMechanism, dict[str, SelectiveCkksMechanism]]:
    server = SelectiveCkksMechanism(secret.public, spec=SPEC, encrypt_ratio=ratio, **kwargs)  # type: ignore[arg-type]
    clients = {name: SelectiveCkksMechanism(secret.public, secret, spec=SPEC, encrypt_ratio=ratio, **kwargs)  # type: ignore[arg-type]
               for name in NAMES}
    return server, clients


def test_clients_agree_on_the_top_of_the_summed_sensitivity_maps(secret: SecretKey) -> None:
    server, clients = _pair(secret, 0.1)
    contributions = _contributions()
    total, stages = _round(server, clients, contributions)
    assert stages == (SENSITIVITY_STAGE, PROTECT_STAGE)
    np.testing.assert_allclose(total, np.sum(contributions, axis=0, dtype=np.float64), atol=1e-4)
    # Oracle: the plaintext sum of the normalized maps, ranked in the clear.
    expected = sensitivity_mask(sum(normalized(_scores(i)) for i in range(len(NAMES))), 0.1)
    masks = {mask_digest(m.mask) for m in clients.values() if m.mask is not None}
    assert masks == {mask_digest(expected)} and server.digest == mask_digest(expected)
    assert server.mask is None  # the server learns which mask, not one client's map
    assert expected[-61:].all()  # the buffer and the weight entry are always encrypted


def test_later_rounds_reuse_the_mask_and_a_late_client_gets_the_map(secret: SecretKey) -> None:
    server, clients = _pair(secret, 0.3)
    _round(server, clients, _contributions(0))
    late = SelectiveCkksMechanism(secret.public, secret, spec=SPEC, encrypt_ratio=0.3)
    clients = {"a": clients["a"], "late": late}
    contributions = _contributions(1)[:2]
    total, stages = _round(server, clients, contributions, round_=2)
    assert stages == (PROTECT_STAGE,)
    assert late.digest == clients["a"].digest
    np.testing.assert_allclose(total, np.sum(contributions, axis=0, dtype=np.float64), atol=1e-4)


def test_only_masked_entries_are_encrypted(secret: SecretKey) -> None:
    _, clients = _pair(secret, 1.0, encrypt_layers=("fc.*",))
    mechanism = clients["a"]
    vector = _contributions()[0]
    payload = mechanism.client_round(_ctx(), "a").respond(PROTECT_STAGE, Payload(), vector)
    mask = layer_mask(SPEC, ("fc.*",))
    np.testing.assert_array_equal(payload.arrays["plain"], vector[~mask])
    assert payload.arrays["c0"].size == SecretKey(PRESETS["fast"]).public.blocks(int(mask.sum())) * 2 * 4096


def test_layer_selection_needs_no_agreement_and_sums_exactly(secret: SecretKey) -> None:
    server, clients = _pair(secret, 1.0, encrypt_layers=("conv.*",))
    contributions = _contributions(2)
    total, stages = _round(server, clients, contributions)
    assert stages == (PROTECT_STAGE,)
    np.testing.assert_allclose(total, np.sum(contributions, axis=0, dtype=np.float64), atol=1e-4)


def test_an_update_under_another_mask_is_rejected_and_the_sum_is_untouched(secret: SecretKey) -> None:
    server, clients = _pair(secret, 1.0, encrypt_layers=("conv.*",))
    other = SelectiveCkksMechanism(secret.public, secret, spec=SPEC, encrypt_layers=("fc.*",))
    ctx = _ctx()
    vectors = _contributions()
    aggregator = server.server_round(ctx)
    aggregator.fold(PROTECT_STAGE, "a", _wire(clients["a"].client_round(ctx, "a").respond(PROTECT_STAGE, Payload(), vectors[0])))
    with pytest.raises(PayloadRejected, match="another encryption mask"):
        aggregator.fold(PROTECT_STAGE, "b", _wire(other.client_round(ctx, "b").respond(PROTECT_STAGE, Payload(), vectors[1])))
    poisoned = clients["c"].client_round(ctx, "c").respond(PROTECT_STAGE, Payload(), vectors[2])
    poisoned.arrays["plain"] = poisoned.arrays["plain"].copy()
    poisoned.arrays["plain"][-1] = np.nan
    with pytest.raises(PayloadRejected, match="NaN"):
        aggregator.fold(PROTECT_STAGE, "c", _wire(poisoned))
    short = clients["c"].client_round(ctx, "c").respond(PROTECT_STAGE, Payload(), vectors[2])
    short.arrays["plain"] = short.arrays["plain"][:-1]
    with pytest.raises(PayloadRejected, match="plaintext part"):
        aggregator.fold(PROTECT_STAGE, "c", _wire(short))
    total = clients["a"].recover(_wire(aggregator.finish()), ctx)
    np.testing.assert_allclose(total, vectors[0], atol=1e-5)


def test_a_client_asked_for_a_mask_it_does_not_hold_refuses(secret: SecretKey) -> None:
    _, clients = _pair(secret, 0.1)
    protector = clients["a"].client_round(_ctx(), "a")
    with pytest.raises(ValueError, match="holds no encryption mask"):
        protector.respond(PROTECT_STAGE, Payload(meta={"mask": "0" * 32}), _contributions()[0])
    layered = SelectiveCkksMechanism(secret.public, secret, spec=SPEC, encrypt_layers=("conv.*",))
    with pytest.raises(ValueError, match="the server asks for mask"):
        layered.client_round(_ctx(), "a").respond(PROTECT_STAGE, Payload(meta={"mask": "0" * 32}), _contributions()[0])
    with pytest.raises(ValueError, match="needs the client's model"):
        clients["a"].client_round(_ctx(), "a").respond(SENSITIVITY_STAGE, Payload(), _contributions()[0])


def test_the_server_instance_cannot_recover(secret: SecretKey) -> None:
    server, clients = _pair(secret, 1.0, encrypt_layers=("conv.*",))
    ctx = _ctx()
    aggregator = server.server_round(ctx)
    aggregator.fold(PROTECT_STAGE, "a", clients["a"].client_round(ctx, "a").respond(PROTECT_STAGE, Payload(), _contributions()[0]))
    with pytest.raises(RecoveryError, match="no CKKS secret key"):
        server.recover(aggregator.finish(), ctx)


def test_bad_settings_are_refused(secret: SecretKey) -> None:
    with pytest.raises(ValueError, match="matches no tensor"):
        SelectiveCkksMechanism(secret.public, spec=SPEC, encrypt_layers=("lstm.*",))
    with pytest.raises(ValueError, match="either encrypt_ratio or encrypt_layers"):
        SelectiveCkksMechanism(secret.public, spec=SPEC, encrypt_ratio=0.5, encrypt_layers=("conv.*",))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        SelectiveCkksMechanism(secret.public, spec=SPEC, encrypt_ratio=0.0)
    mechanism = SelectiveCkksMechanism(secret.public, spec=SPEC, encrypt_ratio=0.5)
    with pytest.raises(ValueError, match="set up for"):
        mechanism.server_round(RoundContext("job", 1, NAMES, SIZE + 5))


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float64, st.integers(1, 300), elements=st.floats(0, 1e6, allow_nan=False)),
    st.floats(1e-3, 1.0),
)
def test_sensitivity_mask_is_the_top_fraction(scores: np.ndarray, ratio: float) -> None:
    mask = sensitivity_mask(scores, ratio)
    chosen = mask[:-1]
    assert mask[-1] and chosen.sum() == selected_count(scores.shape[0], ratio)
    if (~chosen).any():
        assert scores[chosen].min() >= scores[~chosen].max()
    assert np.array_equal(mask, sensitivity_mask(scores.copy(), ratio))  # deterministic


@given(arrays(np.float32, st.integers(1, 100), elements=st.floats(0, 2.0**100, width=32) | st.just(np.inf)))
def test_normalized_scores_lie_in_zero_one(scores: np.ndarray) -> None:
    out = normalized(scores)
    assert ((out >= 0) & (out <= 1)).all()
    assert (out[np.isinf(scores)] == 1).all()


def test_a_mask_most_clients_disagree_with_is_not_kept(secret: SecretKey) -> None:
    """The first answer fixes the round's mask; if it was the odd one out, the next round agrees
    afresh instead of binding the job to it."""
    server, clients = _pair(secret, 0.1)
    ctx = _ctx()
    aggregator = server.server_round(ctx)
    vectors = _contributions()
    protectors = {name: mech.client_round(ctx, name, _FixedLocal(_scores(i))) for i, (name, mech) in
                  enumerate(clients.items())}
    for name, vector in zip(protectors, vectors):
        aggregator.fold(SENSITIVITY_STAGE, name, _wire(protectors[name].respond(SENSITIVITY_STAGE, Payload(), vector)))
    aggregator.close_stage(SENSITIVITY_STAGE, list(protectors))
    replies = {name: protectors[name].respond(PROTECT_STAGE, _request(aggregator.request(PROTECT_STAGE, name)), vector)
               for name, vector in zip(protectors, vectors)}
    replies["a"].meta["mask"] = "f" * 32  # a client that derived another mask answers first
    aggregator.fold(PROTECT_STAGE, "a", _wire(replies["a"]))
    for name in ("b", "c"):
        with pytest.raises(PayloadRejected, match="another encryption mask"):
            aggregator.fold(PROTECT_STAGE, name, _wire(replies[name]))
    aggregator.close_stage(PROTECT_STAGE, ["a"])
    assert server.digest is None
    assert server.server_round(_ctx(2)).stages == (SENSITIVITY_STAGE, PROTECT_STAGE)
