"""The shares mechanism (additive sharing over k aggregators): exact sums, dropouts, sealed seeds
that do not verify, replays, helpers that refuse or vanish, key files."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcrypt.core.helper import HelperAggregator
from fedcrypt.core.mechanism import PayloadRejected, RecoveryError, RoundContext
from fedcrypt.core.messages import ErrorReply, FitIns, Payload, StageIns, StageRes, from_bytes, to_bytes
from fedcrypt.crypto.agreement import public_bytes
from fedcrypt.crypto.ring import FRAC_BITS
from fedcrypt.mechanisms.shares import (
    OPEN,
    PARTIAL,
    PROTECT,
    SEAL,
    STAGES,
    HelperKeyError,
    SharesMechanism,
    helper_names,
    load_helper_public,
    load_helper_secret,
    secret_file,
    write_helper_key,
)

SIZE = 301
Tamper = Callable[[str, str, Payload], Payload]


def _wire(payload: Payload) -> Payload:
    message = from_bytes(to_bytes(StageRes(1, "s", payload), job="job", sender="x")).message
    assert isinstance(message, StageRes)
    return message.payload


class Parties:
    """The server's, the clients' and each helper's instance of one k-aggregator job."""

    def __init__(self, aggregators: int, min_clients: int = 1) -> None:
        self.helpers = helper_names(aggregators)
        keys = {helper: X25519PrivateKey.generate() for helper in self.helpers}
        self.server = SharesMechanism(self.helpers)
        self.client = SharesMechanism(self.helpers, helper_keys={h: public_bytes(k) for h, k in keys.items()})
        self.helper = {h: SharesMechanism(self.helpers, helper_key=k, min_clients=min_clients) for h, k in keys.items()}


def _vectors(names: list[str]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {name: (rng.normal(0, 1, SIZE) * rng.integers(1, 1000)).astype(np.float32) for name in names}


def _exact(vectors: list[np.ndarray]) -> np.ndarray:
    total = sum(np.rint(v.astype(np.float64) * 2.0**FRAC_BITS).astype(np.int64) for v in vectors)
    return (np.asarray(total) / 2.0**FRAC_BITS).astype(np.float32)


def _round(
    parties: Parties,
    clients: int,
    *,
    drop: dict[str, str] | None = None,
    tamper: Tamper | None = None,
    server_round: int = 1,
    silent_helper: str | None = None,
):  # type: ignore[no-untyped-def]
    """All four stages; ``drop`` maps a client to the stage it never answers. Returns the
    aggregator, the context, the vectors and the clients whose share the server added."""
    drop = drop or {}
    names = [f"c{i:02d}" for i in range(clients)]
    ctx = RoundContext("job", server_round, tuple(names), SIZE)
    vectors = _vectors(names)
    aggregator = parties.server.server_round(ctx)
    protectors = {name: parties.client.client_round(ctx, name) for name in names}
    helper_rounds = {h: m.helper_round("job", server_round, h) for h, m in parties.helper.items()}
    alive, summed = names, []
    for stage in STAGES:
        if stage in aggregator.helper_stages:
            answered = []
            for helper, helper_round in helper_rounds.items():
                if helper == silent_helper and stage == PARTIAL:
                    continue
                request = _wire(aggregator.request(stage, helper))
                if tamper is not None:
                    request = tamper(stage, helper, request)
                aggregator.fold(stage, helper, _wire(helper_round.respond(stage, request)))
                answered.append(helper)
            aggregator.close_stage(stage, answered)
            continue
        survivors = []
        for name in alive:
            if drop.get(name) == stage:
                continue
            reply = _wire(protectors[name].respond(stage, _wire(aggregator.request(stage, name)), vectors[name]))
            try:
                aggregator.fold(stage, name, reply)
            except PayloadRejected:
                continue
            survivors.append(name)
            if stage == PROTECT:
                summed.append(name)
        aggregator.close_stage(stage, survivors)
        alive = survivors
    return aggregator, ctx, vectors, summed


@pytest.mark.parametrize(
    ("aggregators", "clients", "drop"),
    [
        (2, 10, {}),
        (3, 10, {"c03": SEAL}),  # 10 %: one client never starts
        (4, 20, {"c01": SEAL, "c04": PROTECT, "c08": PROTECT, "c11": PROTECT, "c15": PROTECT, "c19": SEAL}),  # 30 %
    ],
)
def test_the_aggregators_partial_sums_add_up_to_exactly_the_fixed_point_sum(
    aggregators: int, clients: int, drop: dict[str, str]
) -> None:
    parties = Parties(aggregators)
    aggregator, ctx, vectors, summed = _round(parties, clients, drop=drop)
    assert len(summed) == clients - len(drop)
    total = parties.server.recover(aggregator.finish(), ctx)
    np.testing.assert_array_equal(total, _exact([vectors[name] for name in summed]))
    assert aggregator.metrics() == {"shares_aggregators": float(aggregators), "shares_refused": 0.0}


def test_the_servers_share_alone_looks_uniformly_random() -> None:
    parties = Parties(2)
    ctx = RoundContext("job", 1, ("a",), 4096)
    protector = parties.client.client_round(ctx, "a")
    protector.respond(SEAL, Payload(), np.zeros(4096, np.float32))
    share = np.asarray(protector.respond(PROTECT, Payload(), np.zeros(4096, np.float32)).arrays["share"])
    bits = np.unpackbits(share.view(np.uint8))
    assert abs(bits.mean() - 0.5) < 0.01  # the encoding of zeros is all zero bits; the share is not


def test_a_seed_that_does_not_verify_drops_its_client_with_the_helpers_reason() -> None:
    parties = Parties(3)

    def flip(stage: str, helper: str, request: Payload) -> Payload:
        if stage == OPEN and helper == "aggregator-2":
            seeds = np.array(request.arrays["seeds"])
            seeds[2, 20] ^= 1  # the server (or the wire) altered c02's seed for aggregator-2
            return Payload(request.meta, {**request.arrays, "seeds": seeds})
        return request

    aggregator, ctx, vectors, summed = _round(parties, 6, tamper=flip)
    assert summed == ["c00", "c01", "c03", "c04", "c05"]
    with pytest.raises(PayloadRejected, match="aggregator-2 refused its sealed seed: it does not verify"):
        aggregator.fold(PROTECT, "c02", Payload({"excluded": True}))
    np.testing.assert_array_equal(parties.server.recover(aggregator.finish(), ctx), _exact([vectors[n] for n in summed]))
    assert aggregator.metrics()["shares_refused"] == 1


def _sealed(parties: Parties, names: list[str]):  # type: ignore[no-untyped-def]
    """A server aggregator that has folded the ``seal`` replies of ``names``."""
    ctx = RoundContext("job", 1, tuple(names), SIZE)
    aggregator = parties.server.server_round(ctx)
    for name in names:
        protector = parties.client.client_round(ctx, name)
        aggregator.fold(SEAL, name, _wire(protector.respond(SEAL, Payload(), np.zeros(SIZE, np.float32))))
    return aggregator


def test_a_helper_opens_each_client_key_once_and_sums_each_seed_once() -> None:
    parties = Parties(2)
    helper = parties.helper["aggregator-1"]
    request = _wire(_sealed(parties, ["a", "b", "c"]).request(OPEN, "aggregator-1"))
    first = helper.helper_round("job", 1, "aggregator-1")
    assert first.respond(OPEN, request).meta["refused"] == {}
    again = helper.helper_round("job", 1, "aggregator-1")  # the same sealed seeds, relayed again
    refused = again.respond(OPEN, request).meta["refused"]
    assert set(refused) == {"a", "b", "c"} and all("replay" in reason for reason in refused.values())
    with pytest.raises(ValueError, match="did not open: a"):
        again.respond(PARTIAL, Payload({"clients": ["a"]}))
    first.respond(PARTIAL, Payload({"clients": ["a", "b", "c"]}))
    assert first.done
    with pytest.raises(ValueError, match="did not open"):  # no second sum over another subset
        first.respond(PARTIAL, Payload({"clients": ["a", "b"]}))
    with pytest.raises(ValueError, match="before opening"):
        helper.helper_round("job", 2, "aggregator-1").respond(PARTIAL, Payload({"clients": []}))


def test_a_helper_refuses_a_partial_sum_over_too_few_clients() -> None:
    parties = Parties(2, min_clients=3)
    aggregator = _sealed(parties, ["a", "b", "c"])
    helper_round = parties.helper["aggregator-1"].helper_round("job", 1, "aggregator-1")
    helper_round.respond(OPEN, _wire(aggregator.request(OPEN, "aggregator-1")))
    with pytest.raises(ValueError, match="fewer than the job's minimum of 3"):
        helper_round.respond(PARTIAL, Payload({"clients": ["a", "b"]}))  # a server isolating one client
    assert not helper_round.done


def test_a_helper_that_does_not_answer_fails_the_round_never_a_wrong_sum() -> None:
    parties = Parties(3)
    with pytest.raises(RecoveryError, match="aggregator-2 did not answer the 'partial' stage; additive sharing needs all 3"):
        _round(parties, 4, silent_helper="aggregator-2")


@pytest.mark.parametrize(
    ("stage", "payload", "reason"),
    [
        (SEAL, Payload(arrays={"key": np.zeros((1, 32), np.uint8), "seeds": np.zeros((1, 60), np.uint8)}), "usable"),
        (SEAL, Payload(arrays={"key": np.ones((1, 32), np.uint8)}), "'seeds' must be"),
        (PROTECT, Payload(arrays={"share": np.zeros(SIZE, np.int64)}), "uint64 vector"),
        (PROTECT, Payload(arrays={"share": np.zeros(SIZE - 1, np.uint64)}), "uint64 vector"),
        (OPEN, Payload({"refused": {"nobody": "x"}}), "malformed"),
        (PARTIAL, Payload(arrays={"sum": np.zeros(3, np.uint64)}), "uint64 vector"),
    ],
)
def test_malformed_replies_are_rejected_with_a_reason(stage: str, payload: Payload, reason: str) -> None:
    aggregator = _sealed(Parties(2), ["a"])
    with pytest.raises(PayloadRejected, match=reason):
        sender = {SEAL: "b", PROTECT: "a"}.get(stage, "aggregator-1")
        aggregator.fold(stage, sender, payload)


def test_a_duplicated_round_key_is_rejected() -> None:
    parties = Parties(2)
    ctx = RoundContext("job", 1, ("a", "b"), SIZE)
    aggregator = parties.server.server_round(ctx)
    reply = _wire(parties.client.client_round(ctx, "a").respond(SEAL, Payload(), np.zeros(SIZE, np.float32)))
    aggregator.fold(SEAL, "a", reply)
    with pytest.raises(PayloadRejected, match="duplicated round key"):
        aggregator.fold(SEAL, "b", reply)  # b replays a's key and seeds


def test_clients_refuse_values_whose_sum_could_overflow_the_ring() -> None:
    parties = Parties(2)
    ctx = RoundContext("job", 1, ("a", "b"), 4)
    protector = parties.client.client_round(ctx, "a")
    protector.respond(SEAL, Payload(), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="overflow the ring"):
        protector.respond(PROTECT, Payload(), np.array([0, 0, 0, 2.0**38], np.float32))


def test_the_helper_process_logic_refuses_what_is_not_its_job() -> None:
    parties = Parties(2)
    helper = HelperAggregator("aggregator-1", "job", parties.helper["aggregator-1"])
    wrong_job = from_bytes(b"".join(helper.handle(to_bytes(StageIns(1, OPEN, Payload()), job="other", sender="server"))))
    assert isinstance(wrong_job.message, ErrorReply) and "wrong job" in wrong_job.message.reason
    fit = to_bytes(FitIns(1, np.zeros(3, np.float32), {}, ("a",), Payload(), SEAL), job="job", sender="server")
    refused = from_bytes(b"".join(helper.handle(fit))).message
    assert isinstance(refused, ErrorReply) and "does not answer a FitIns" in refused.reason
    garbage = from_bytes(b"".join(helper.handle(b"not a message"))).message
    assert isinstance(garbage, ErrorReply) and "undecodable" in garbage.reason
    with pytest.raises(ValueError, match="not a helper aggregator"):
        HelperAggregator("aggregator-7", "job", parties.helper["aggregator-1"])


def test_helper_key_files_round_trip_and_the_secret_is_private(tmp_path: Path) -> None:
    public = write_helper_key(tmp_path, "aggregator-1")
    write_helper_key(tmp_path, "aggregator-2")
    assert stat.S_IMODE((tmp_path / secret_file("aggregator-1")).stat().st_mode) == 0o600
    assert public_bytes(load_helper_secret(tmp_path, "aggregator-1")) == public
    assert load_helper_public(tmp_path, ["aggregator-1", "aggregator-2"])["aggregator-1"] == public
    with pytest.raises(HelperKeyError, match="refusing to overwrite"):
        write_helper_key(tmp_path, "aggregator-1")
    with pytest.raises(HelperKeyError, match="fedcrypt keys aggregator --name aggregator-3"):
        load_helper_public(tmp_path, ["aggregator-3"])
    (tmp_path / "aggregator-2.public.json").write_text('{"scheme": "x25519", "helper": "aggregator-1", "public_key": "00"}')
    with pytest.raises(HelperKeyError, match="not the X25519 key file of helper aggregator 'aggregator-2'"):
        load_helper_public(tmp_path, ["aggregator-2"])


def test_a_client_without_every_helpers_key_cannot_be_built() -> None:
    with pytest.raises(ValueError, match=r"\['aggregator-2'\] are missing"):
        SharesMechanism(helper_names(3), helper_keys={"aggregator-1": public_bytes(X25519PrivateKey.generate())})
    with pytest.raises(ValueError, match="at least 2 aggregators"):
        helper_names(1)
