"""The batchcrypt mechanism: the two-stage round against the plaintext sum, bad statistics and
ciphertexts, overflow, key separation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedcrypt.core.mechanism import PayloadRejected, RecoveryError, RoundContext, ServerAggregator
from fedcrypt.core.messages import FitRes, Payload, from_bytes, to_bytes
from fedcrypt.crypto.batching import levels
from fedcrypt.crypto.paillier import generate_keypair
from fedcrypt.mechanisms import BatchCryptMechanism, Options, client_mechanism, server_mechanism
from fedcrypt.mechanisms.batchcrypt import PROTECT_STAGE, STATS_STAGE
from fedcrypt.mechanisms.paillier import write_keys

TENSORS = (300, 40, 900)
SIZE = sum(TENSORS) + 1
NAMES = ("a", "b", "c", "d", "e")
CTX = RoundContext("job", 1, NAMES, SIZE)


@pytest.fixture(scope="module")
def keys():  # type: ignore[no-untyped-def]
    return generate_keypair(1024)


def _pair(keys, bits: int = 16) -> tuple[BatchCryptMechanism, BatchCryptMechanism]:  # type: ignore[no-untyped-def]
    public, private = keys
    return (
        BatchCryptMechanism(public, bits=bits, tensor_sizes=TENSORS),
        BatchCryptMechanism(public, private, bits=bits, tensor_sizes=TENSORS),
    )


def _wire(payload: Payload) -> Payload:
    message = from_bytes(to_bytes(FitRes(1, 1, {}, payload), job="job", sender="a")).message
    assert isinstance(message, FitRes)
    return message.payload


def _vectors(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    scales = (0.01, 3.0, 0.2)  # tensors of very different magnitudes get their own thresholds
    out = []
    for _ in range(count):
        parts = [rng.normal(0, scale, size) for scale, size in zip(scales, TENSORS)]
        out.append(np.concatenate([*parts, [rng.integers(10, 100)]]).astype(np.float32))
    return out


def _round(server_side: BatchCryptMechanism, client_side: BatchCryptMechanism, vectors: list[np.ndarray]):  # type: ignore[no-untyped-def]
    """Both stages for ``len(vectors)`` clients; returns the aggregator after the stats stage and
    the protectors with their vectors, ready for the protect stage."""
    aggregator = server_side.server_round(CTX)
    assert aggregator.stages == (STATS_STAGE, PROTECT_STAGE)
    protectors = {name: client_side.client_round(CTX, name) for name in NAMES[: len(vectors)]}
    for (name, protector), vector in zip(protectors.items(), vectors):
        reply = protector.respond(STATS_STAGE, _wire(aggregator.request(STATS_STAGE, name)), vector)
        assert not protector.done
        aggregator.fold(STATS_STAGE, name, _wire(reply))
    aggregator.close_stage(STATS_STAGE, list(protectors))
    return aggregator, protectors


def _protect_all(aggregator: ServerAggregator, protectors, vectors) -> None:  # type: ignore[no-untyped-def]
    for (name, protector), vector in zip(protectors.items(), vectors):
        reply = protector.respond(PROTECT_STAGE, _wire(aggregator.request(PROTECT_STAGE, name)), vector)
        assert protector.done
        aggregator.fold(PROTECT_STAGE, name, _wire(reply))


@pytest.mark.parametrize("bits", [16, 8])
def test_the_decrypted_sum_is_the_plaintext_sum_within_the_quantization_step(keys, bits: int) -> None:  # type: ignore[no-untyped-def]
    server_side, client_side = _pair(keys, bits)
    vectors = _vectors(5)
    aggregator, protectors = _round(server_side, client_side, vectors)
    _protect_all(aggregator, protectors, vectors)
    aggregate = _wire(aggregator.finish())
    total = client_side.recover(aggregate, CTX)
    alphas = np.repeat(aggregate.arrays["alpha"], [*TENSORS, 1])
    clipped = [np.clip(v.astype(np.float64), -alphas, alphas) for v in vectors]  # dACIQ clips outliers
    exact = np.sum(clipped, axis=0)
    assert np.abs(total - exact).max() <= (len(vectors) * alphas / levels(bits)).max() * 1.0001
    np.testing.assert_array_less(np.abs(total - exact), len(vectors) * alphas / levels(bits) + 1e-6)
    if bits == 16:  # no clipping pays at 16 bits: the thresholds are the global peaks
        np.testing.assert_allclose(aggregate.arrays["alpha"][:3], [np.abs(np.stack(vectors)[:, s]).max() for s in
                                   (slice(0, 300), slice(300, 340), slice(340, 1240))], rtol=1e-6)
    assert aggregator.metrics()["batchcrypt_bytes_per_value"] < 4.5


def test_stochastic_rounding_keeps_the_sum_unbiased_over_rounds(keys) -> None:  # type: ignore[no-untyped-def]
    server_side, client_side = _pair(keys, 4)  # coarse on purpose
    vectors = _vectors(2)
    errors = []
    for _ in range(12):
        aggregator, protectors = _round(server_side, client_side, vectors)
        _protect_all(aggregator, protectors, vectors)
        aggregate = aggregator.finish()
        alphas = np.repeat(aggregate.arrays["alpha"], [*TENSORS, 1])
        exact = np.sum([np.clip(v, -alphas, alphas) for v in vectors], axis=0)
        errors.append(client_side.recover(aggregate, CTX) - exact)
    step = np.repeat(aggregate.arrays["alpha"], [*TENSORS, 1]) / levels(4)
    mean_error = np.mean(errors, axis=0)[:-1] / step[:-1]  # in quantization steps
    assert abs(mean_error.mean()) < 0.05  # rounding to nearest would bias every value the same way


def test_absurd_statistics_are_rejected_and_the_round_goes_on(keys) -> None:  # type: ignore[no-untyped-def]
    server_side, client_side = _pair(keys)
    vectors = _vectors(2)
    aggregator = server_side.server_round(CTX)
    good = client_side.client_round(CTX, "a").respond(STATS_STAGE, Payload(), vectors[0])
    fingerprint = good.meta
    ranges = good.arrays["range"]
    cases = {
        "absurd": ranges * 1e12,
        "NaN/Inf": np.where(np.arange(ranges.size).reshape(ranges.shape) == 3, np.nan, ranges),
        "min exceeds max": ranges[:, ::-1].copy(),
        "shape": ranges[:-1],
    }
    for reason, bad in cases.items():
        with pytest.raises(PayloadRejected, match=reason):
            aggregator.fold(STATS_STAGE, "b", _wire(Payload(dict(fingerprint), {"range": bad})))
    stranger = BatchCryptMechanism(*generate_keypair(1024), tensor_sizes=TENSORS)
    with pytest.raises(PayloadRejected, match="fingerprint"):
        aggregator.fold(STATS_STAGE, "b", stranger.client_round(CTX, "b").respond(STATS_STAGE, Payload(), vectors[1]))
    aggregator.fold(STATS_STAGE, "a", _wire(good))
    aggregator.close_stage(STATS_STAGE, ["a"])  # the rejected client is not in the round any more
    plan = aggregator.request(PROTECT_STAGE, "a")
    assert plan.meta["clients"] == 1
    np.testing.assert_allclose(plan.arrays["alpha"][:3], np.abs(ranges[:3]).max(axis=1), rtol=1e-6)


def test_bad_ciphertexts_are_rejected_and_leave_the_sum_untouched(keys) -> None:  # type: ignore[no-untyped-def]
    server_side, client_side = _pair(keys)
    vectors = _vectors(2)
    aggregator, protectors = _round(server_side, client_side, vectors)
    first, second = protectors.values()
    aggregator.fold(PROTECT_STAGE, "a", _wire(first.respond(PROTECT_STAGE, aggregator.request(PROTECT_STAGE, "a"), vectors[0])))
    good = second.respond(PROTECT_STAGE, aggregator.request(PROTECT_STAGE, "b"), vectors[1])
    cipher = good.arrays["c"]
    zero, huge = np.array(cipher), np.array(cipher)
    zero[3] = 0
    huge[2] = 255  # >= n^3
    stranger = BatchCryptMechanism(*generate_keypair(1024), tensor_sizes=TENSORS)
    cases = {
        "not invertible": Payload(dict(good.meta), {"c": zero}),
        "out of range": Payload(dict(good.meta), {"c": huge}),
        "expected": Payload(dict(good.meta), {"c": cipher[:-1]}),
        "bytes": Payload(dict(good.meta), {"c": cipher[:, :-5]}),
        "fingerprint": Payload({"fingerprint": stranger.public.fingerprint}, {"c": cipher}),
    }
    for reason, payload in cases.items():
        with pytest.raises(PayloadRejected, match=reason):
            aggregator.fold(PROTECT_STAGE, "b", _wire(payload))
    aggregate = aggregator.finish()
    alphas = np.repeat(aggregate.arrays["alpha"], [*TENSORS, 1])
    np.testing.assert_allclose(client_side.recover(aggregate, CTX), vectors[0], atol=float(2 * alphas.max() / levels(16)))


def test_an_overflowed_aggregate_is_reported_never_a_wrong_number(keys) -> None:  # type: ignore[no-untyped-def]
    server_side, client_side = _pair(keys, 8)
    vectors = _vectors(2)
    aggregator, protectors = _round(server_side, client_side, vectors)
    _protect_all(aggregator, protectors, vectors)
    aggregate = aggregator.finish()
    public = client_side.public
    forged = public.encrypt([levels(8) * 2**8])[0]  # slot 0 gets 255 * 2^8: beyond 2 clients' range
    rows = public.from_array(aggregate.arrays["c"])
    rows[0] = public.add(rows[0], forged)
    tampered = Payload(dict(aggregate.meta), {"alpha": aggregate.arrays["alpha"], "c": public.to_array(rows)})
    with pytest.raises(RecoveryError, match="overflowed"):
        client_side.recover(tampered, CTX)


def test_clients_refuse_a_plan_they_cannot_trust(keys) -> None:  # type: ignore[no-untyped-def]
    server_side, client_side = _pair(keys)
    vectors = _vectors(1)
    aggregator, protectors = _round(server_side, client_side, vectors)
    plan = aggregator.request(PROTECT_STAGE, "a")
    protector = protectors["a"]
    bad_plans = {
        "quantizes to 8 bits": Payload({**plan.meta, "bits": 8}, plan.arrays),
        "implausible client count": Payload({**plan.meta, "clients": 99}, plan.arrays),
        "finite and positive": Payload(dict(plan.meta), {"alpha": -plan.arrays["alpha"]}),
        "another key": Payload({**plan.meta, "fingerprint": "0" * 32}, plan.arrays),
    }
    for reason, bad in bad_plans.items():
        with pytest.raises(ValueError, match=reason):
            protector.respond(PROTECT_STAGE, bad, vectors[0])
    with pytest.raises(ValueError, match="NaN"):
        client_side.client_round(CTX, "b").respond(STATS_STAGE, Payload(), np.full(SIZE, np.nan, dtype=np.float32))


def test_roles_and_key_files(keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    write_keys(tmp_path, keys[1])
    server = server_mechanism("batchcrypt", key_dir=tmp_path, options=Options(bits=8))
    client = client_mechanism("batchcrypt", key_dir=tmp_path, options=Options(bits=8))
    assert isinstance(server, BatchCryptMechanism) and server._private is None and server.bits == 8
    assert isinstance(client, BatchCryptMechanism) and client._private is not None
    with pytest.raises(ValueError, match="no Paillier private key"):
        server.client_round(CTX, "a")
    with pytest.raises(RecoveryError, match="no Paillier private key"):
        server.recover(Payload(), CTX)


def test_randomness_computed_while_waiting_is_used_by_the_protect_stage(keys) -> None:  # type: ignore[no-untyped-def]
    server_side, client_side = _pair(keys)
    vectors = _vectors(2)
    aggregator, protectors = _round(server_side, client_side, vectors)  # each stats reply starts its randomness
    most = client_side.layout(len(NAMES)).plaintexts(SIZE)
    for protector in protectors.values():
        protector._randomness.join()  # type: ignore[attr-defined]
        assert len(protector._ready) == most  # type: ignore[attr-defined]
    assert client_side._obfuscators == []
    _protect_all(aggregator, protectors, vectors)
    needed = client_side.layout(2).plaintexts(SIZE)
    assert needed < most and len(client_side._obfuscators) == 2 * (most - needed)  # the unused go back to the pool
    assert np.isfinite(client_side.recover(aggregator.finish(), CTX)).all()


def test_precomputed_randomness_is_consumed_once(keys) -> None:  # type: ignore[no-untyped-def]
    server_side, _ = _pair(keys)
    client_side = BatchCryptMechanism(*keys, tensor_sizes=TENSORS, background_randomness=False)
    vectors = _vectors(1)
    client_side.precompute(3)
    pool = list(client_side._obfuscators)
    aggregator, protectors = _round(server_side, client_side, vectors)
    _protect_all(aggregator, protectors, vectors)
    assert client_side._obfuscators == []
    ciphertexts = client_side.public.from_array(aggregator.finish().arrays["c"])
    assert len(ciphertexts) == client_side.layout(1).plaintexts(SIZE)
    n = client_side.public.n
    assert [c % n for c in ciphertexts[:3]] == [r % n for r in pool]  # g^m = 1 mod n, so c = r^(n^s) mod n
    assert len(set(c % n for c in ciphertexts)) == len(ciphertexts)  # the rest drew fresh randomness


def test_pieces_of_the_aggregate_recover_to_the_whole(keys, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("fedcrypt.core.mechanism.MIN_PIECE_ROWS", 2)  # this small test has 7 ciphertexts
    server_side, client_side = _pair(keys, 8)
    vectors = _vectors(3)
    aggregator, protectors = _round(server_side, client_side, vectors)
    _protect_all(aggregator, protectors, vectors)
    aggregate = _wire(aggregator.finish())
    whole = client_side.recover(aggregate, CTX)
    pieces = server_side.split(aggregate, CTX, 4)
    assert len(pieces) > 1 and pieces[0].start == 0 and pieces[-1].stop == SIZE
    assert all(a.stop == b.start for a, b in zip(pieces, pieces[1:]))
    joined = np.concatenate([client_side.recover(_wire(piece.payload), CTX) for piece in pieces])
    np.testing.assert_array_equal(joined, whole)
    bad = pieces[1].payload
    for rows in ([5, 2], [0, 10**6], "0:3", [0.0, 1.0]):
        with pytest.raises(RecoveryError, match="malformed aggregate piece"):
            client_side.recover(Payload({**bad.meta, "rows": rows}, bad.arrays), CTX)
