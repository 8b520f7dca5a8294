"""The secagg mechanism (SecAgg+): exact sums under dropouts at every stage, clean failure below
the threshold, and rejection of bad keys and shares."""

from __future__ import annotations

import numpy as np
import pytest

from fedcrypt.core.mechanism import PayloadRejected, RecoveryError, RoundContext
from fedcrypt.core.messages import Payload, StageRes, from_bytes, to_bytes
from fedcrypt.mechanisms import SecAggMechanism, build_mechanism
from fedcrypt.crypto.ring import FRAC_BITS
from fedcrypt.mechanisms.secagg import ADVERTISE, MASK, SHARE, STAGES, UNMASK

SIZE = 257


def _wire(payload: Payload) -> Payload:
    message = from_bytes(to_bytes(StageRes(1, "s", payload), job="job", sender="x")).message
    assert isinstance(message, StageRes)
    return message.payload


def _vectors(names: list[str]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {name: (rng.normal(0, 1, SIZE) * rng.integers(1, 300)).astype(np.float32) for name in names}


def _round(mechanism: SecAggMechanism, clients: int, drop: dict[str, str], tamper=None):  # type: ignore[no-untyped-def]
    """All four stages; ``drop`` maps a client to the stage it never answers. Returns the
    recovered sum, the exact fixed-point sum of the clients whose masked vector arrived, and the
    aggregator."""
    names = [f"c{i:02d}" for i in range(clients)]
    ctx = RoundContext("job", 1, tuple(names), SIZE)
    vectors = _vectors(names)
    aggregator = mechanism.server_round(ctx)
    protectors = {name: mechanism.client_round(ctx, name) for name in names}
    alive, contributed = names, []
    for stage in STAGES:
        survivors = []
        for name in alive:
            if drop.get(name) == stage:
                continue
            request = _wire(aggregator.request(stage, name))
            if tamper is not None:
                request = tamper(stage, name, request)
            aggregator.fold(stage, name, _wire(protectors[name].respond(stage, request, vectors[name])))
            survivors.append(name)
            if stage == MASK:
                contributed.append(name)
        aggregator.close_stage(stage, survivors)
        alive = survivors
    exact = sum(np.rint(vectors[name].astype(np.float64) * 2.0**FRAC_BITS).astype(np.int64) for name in contributed)
    return mechanism.recover(aggregator.finish(), ctx), (exact / 2.0**FRAC_BITS).astype(np.float32), aggregator


@pytest.mark.parametrize(
    ("clients", "neighbors", "drop"),
    [
        (12, None, {}),  # 0 % dropouts
        (20, 6, {"c03": SHARE, "c11": MASK}),  # 10 %, sparse SecAgg+ graph: one drops before sharing, one after
        (20, None, {"c01": SHARE, "c05": MASK, "c06": MASK, "c09": MASK, "c13": UNMASK, "c17": UNMASK}),  # 30 %
        (6, 10, {"c02": MASK}),  # classic SecAgg: complete graph
    ],
)
def test_the_unmasked_sum_is_exactly_the_fixed_point_sum(clients: int, neighbors: int | None, drop: dict[str, str]) -> None:
    mechanism = SecAggMechanism(neighbors=neighbors)
    total, exact, aggregator = _round(mechanism, clients, drop)
    np.testing.assert_array_equal(total, exact)
    metrics = aggregator.metrics()
    degree = mechanism.degree(clients - sum(stage == ADVERTISE for stage in drop.values()))
    assert metrics["secagg_neighbors"] == degree and metrics["secagg_threshold"] > degree / 2
    assert metrics["secagg_dropped_after_sharing"] == sum(stage == MASK for stage in drop.values())


def test_the_neighbour_graph_is_regular_and_symmetric() -> None:
    mechanism = SecAggMechanism(neighbors=4)
    _, _, aggregator = _round(mechanism, 15, {})
    graph = aggregator._graph
    assert all(len(linked) == 4 for linked in graph.values())
    assert all(i in graph[j] for i, linked in graph.items() for j in linked)


def test_fewer_than_threshold_survivors_fail_cleanly_never_a_wrong_sum() -> None:
    mechanism = SecAggMechanism()
    with pytest.raises(RecoveryError, match="only 2 clients left after 'mask'"):
        _round(mechanism, 5, {"c00": MASK, "c01": MASK, "c02": MASK})
    with pytest.raises(RecoveryError, match=r"only 2 shares of the self-mask seed of c0\d, 3 needed"):
        _round(mechanism, 5, {"c00": UNMASK, "c01": UNMASK, "c02": UNMASK})
    with pytest.raises(RecoveryError, match="at least 3 clients"):
        _round(mechanism, 2, {})


def test_bad_keys_and_shares_are_rejected_with_a_reason() -> None:
    mechanism = SecAggMechanism()
    ctx = RoundContext("job", 1, ("a", "b", "c", "d"), SIZE)
    aggregator = mechanism.server_round(ctx)
    first = mechanism.client_round(ctx, "a").respond(ADVERTISE, Payload(), np.zeros(SIZE, np.float32))
    aggregator.fold(ADVERTISE, "a", first)
    cases = {
        "duplicated public key": first,
        "not usable X25519": Payload(arrays={"c_pk": np.zeros((1, 32), np.uint8), "s_pk": first.arrays["s_pk"]}),
        "shape": Payload(arrays={"c_pk": first.arrays["c_pk"][:, :16], "s_pk": first.arrays["s_pk"]}),
    }
    for reason, payload in cases.items():
        with pytest.raises(PayloadRejected, match=reason):
            aggregator.fold(ADVERTISE, "b", payload)


def test_a_share_that_does_not_verify_is_not_used_and_the_round_still_finishes() -> None:
    def corrupt(stage: str, name: str, request: Payload) -> Payload:
        if stage == MASK and name == "c04":
            shares = np.array(request.arrays["shares"])
            shares[0, -1] ^= 1  # flip a bit of the GCM tag of the first share sent to c04
            return Payload(dict(request.meta), {"shares": shares})
        return request

    total, exact, _ = _round(SecAggMechanism(), 8, {}, tamper=corrupt)
    np.testing.assert_array_equal(total, exact)


def test_clients_refuse_to_reveal_both_secrets_of_one_client() -> None:
    def greedy(stage: str, name: str, request: Payload) -> Payload:
        if stage == UNMASK:  # a server asking for a survivor's self-mask share and its key share
            return Payload({"survivors": request.meta["survivors"], "dropped": request.meta["survivors"][:1]})
        return request

    with pytest.raises(ValueError, match="both shares"):
        _round(SecAggMechanism(), 5, {}, tamper=greedy)


def test_implausible_plans_and_overflowing_values_are_refused() -> None:
    mechanism = SecAggMechanism()

    def weak(stage: str, name: str, request: Payload) -> Payload:
        if stage == SHARE:
            return Payload({**request.meta, "threshold": 1}, request.arrays)
        return request

    with pytest.raises(ValueError, match="implausible neighbour list or threshold"):
        _round(mechanism, 5, {}, tamper=weak)
    ctx = RoundContext("job", 1, ("a", "b", "c"), 2)
    protector = mechanism.client_round(ctx, "a")
    protector._neighbours = protector._senders = []  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="overflow the ring"):
        protector.respond(MASK, Payload({"senders": []}, {"shares": np.zeros((0, 94), np.uint8)}), np.full(2, 1e13))
    with pytest.raises(ValueError, match="threshold must be a fraction"):
        SecAggMechanism(threshold=0.3)
    assert isinstance(build_mechanism("secagg"), SecAggMechanism)
