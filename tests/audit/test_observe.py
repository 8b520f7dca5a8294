"""What the audit says the server reads, checked against independent computations: autograd's
own gradient for plaintext updates, the selective mechanism's own mask, the clip bound for DP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedcrypt.audit.leakage import selection_mask
from fedcrypt.audit.observe import audit_batches, gradient_of, observe_round
from fedcrypt.core.params import load_flat


def autograd_gradient(observed, batch) -> np.ndarray:
    """The batch gradient at the round's global model, straight from autograd."""
    model = observed.trainer.model
    load_flat(model, observed.params, observed.spec)
    model.zero_grad()
    nn.functional.cross_entropy(model(batch.x), batch.y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()


def test_a_plaintext_update_shows_the_exact_batch_gradient(lenet_job, mnist) -> None:
    job = lenet_job()
    observed = observe_round(job, mnist, audit_batches(mnist, 2, 1, seed=3))
    for observation in observed.observations:
        assert observation.readable == 1.0
        assert observation.view[-1] == 1.0  # the weight: one example
        read = gradient_of(observation.view, observed.params, observed.trainer.config, job.strategy.weighting)
        truth = autograd_gradient(observed, observation.batch)
        np.testing.assert_allclose(read, truth, atol=2e-5)


@pytest.mark.parametrize("mechanism", ["ckks", "paillier", "batchcrypt"])
def test_ciphertexts_show_nothing(lenet_job, mnist, mechanism: str) -> None:
    job = lenet_job(privacy={"mechanism": mechanism, "paillier_bits": 1024})
    observed = observe_round(job, mnist, audit_batches(mnist, 2, 1, seed=0))
    assert [o.view for o in observed.observations] == [None, None]


def test_selective_ckks_shows_the_unmasked_entries_under_the_mechanisms_own_mask(lenet_job, mnist) -> None:
    batches = audit_batches(mnist, 3, 1, seed=1)
    plain = observe_round(lenet_job(), mnist, batches)
    selective = observe_round(lenet_job(privacy={"mechanism": "ckks", "encrypt_ratio": 0.1}), mnist, batches)
    # The audit's own sensitivity mask (used by the sweep) is the one the clients agreed in the protocol.
    mask = selection_mask("sensitivity", 0.1, plain)
    for seen, clear in zip(selective.observations, plain.observations):
        np.testing.assert_array_equal(np.isnan(seen.view), mask)
        np.testing.assert_array_equal(seen.view[~mask], clear.view[~mask])
        assert seen.readable == pytest.approx(1 - mask.mean())


@pytest.mark.parametrize("mechanism", ["secagg", "shares"])
def test_masked_and_shared_vectors_are_unrelated_to_the_update(lenet_job, mnist, mechanism: str) -> None:
    batches = audit_batches(mnist, 3, 1, seed=2)
    plain = observe_round(lenet_job(), mnist, batches)
    masked = observe_round(lenet_job(privacy={"mechanism": mechanism}), mnist, batches)
    for seen, clear in zip(masked.observations, plain.observations):
        assert seen.readable == 1.0  # the server reads every value...
        correlation = np.corrcoef(seen.view.astype(np.float64), clear.view.astype(np.float64))[0, 1]
        assert abs(correlation) < 0.05  # ...and none of them tells it anything
        assert np.abs(seen.view).max() > 1e3 * np.abs(clear.view).max()


def test_central_dp_shows_the_clipped_update_and_local_dp_a_noised_one(lenet_job, mnist) -> None:
    batches = audit_batches(mnist, 2, 1, seed=4)
    uniform = {"weighting": "uniform"}
    plain = observe_round(lenet_job(strategy=uniform), mnist, batches)
    central = observe_round(
        lenet_job(strategy=uniform, dp={"noise": "central", "noise_multiplier": 1.0, "clip_norm": 0.01}), mnist, batches
    )
    local = observe_round(
        lenet_job(strategy=uniform, dp={"noise": "local", "noise_multiplier": 1.0, "clip_norm": 0.01}), mnist, batches
    )
    for clear, clipped, noised in zip(plain.observations, central.observations, local.observations):
        delta, seen = clear.view[:-1].astype(np.float64), clipped.view[:-1].astype(np.float64)
        assert np.linalg.norm(delta) > 0.01
        assert np.linalg.norm(seen) == pytest.approx(0.01, rel=1e-4)
        assert seen @ delta / (np.linalg.norm(seen) * np.linalg.norm(delta)) > 0.9999  # same direction
        noise = noised.view[:-1].astype(np.float64) - seen
        assert np.std(noise) == pytest.approx(0.01, rel=0.05)  # z * C per entry


def test_audit_batches_are_disjoint_and_sized(lenet_job, mnist) -> None:
    batches = audit_batches(mnist, 3, 4, seed=0)
    assert [tuple(b.x.shape) for b in batches] == [(4, 1, 28, 28)] * 3
    flat = torch.cat([b.x.reshape(12 // 3, -1) for b in batches])
    assert torch.unique(flat, dim=0).shape[0] == 12
    with pytest.raises(ValueError, match="need 120000 examples"):
        audit_batches(mnist, 2, 60_000, seed=0)
