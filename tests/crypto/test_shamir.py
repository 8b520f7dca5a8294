"""Shamir secret sharing: any threshold subset reconstructs, fewer fail, wrong shares are caught."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrypt.crypto import shamir


@given(st.binary(min_size=32, max_size=32), st.integers(1, 8), st.integers(0, 4), st.randoms(use_true_random=False))
@settings(max_examples=60, deadline=None)
def test_any_threshold_subset_reconstructs_the_secret(secret: bytes, threshold: int, extra: int, rng) -> None:  # type: ignore[no-untyped-def]
    xs = rng.sample(range(1, 1000), threshold + extra)
    shares = shamir.split(secret, threshold, xs)
    for subset in itertools.islice(itertools.combinations(sorted(shares), threshold), 10):
        assert shamir.combine({x: shares[x] for x in subset}, threshold) == secret
    assert shamir.combine(shares, threshold) == secret  # extra shares are checked and agree
    assert all(shamir.from_bytes(shamir.to_bytes(v)) == v for v in shares.values())


def test_too_few_or_wrong_shares_never_give_a_wrong_secret() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    with pytest.raises(shamir.ShamirError, match="2 shares, 3 needed"):
        shamir.combine({1: shares[1], 2: shares[2]}, 3)
    tampered = dict(shares)
    tampered[4] = (tampered[4] + 1) % shamir.P
    with pytest.raises(shamir.ShamirError, match="inconsistent"):
        shamir.combine(tampered, 3)
    with pytest.raises(shamir.ShamirError, match="distinct and nonzero"):
        shamir.split(secret, 2, [0, 1, 2])
    with pytest.raises(shamir.ShamirError, match="threshold"):
        shamir.split(secret, 4, [1, 2, 3])
    with pytest.raises(shamir.ShamirError, match="out of the field"):
        shamir.from_bytes(shamir.P.to_bytes(shamir.SHARE_BYTES, "big"))
