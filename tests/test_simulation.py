"""End-to-end simulations through the public Python API."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fedcrypt
from fedcrypt.config.job import load_job
from fedcrypt.core.client import Client
from fedcrypt.core.mechanism import RecoveryError
from fedcrypt.core.server import Server
from fedcrypt.crypto.ckks import PRESETS, SecretKey
from fedcrypt.data import load_dataset
from fedcrypt.mechanisms import CkksMechanism
from fedcrypt.models.training import ClientData
from fedcrypt.simulation import build_trainer, partition_clients, train_tensors
from fedcrypt.mechanisms.plaintext import PlaintextMechanism
from fedcrypt.strategies import FedAvg
from fedcrypt.transport.inprocess import InProcessTransport

from core.test_server import ScriptedClient

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.toml"


def test_quickstart_reaches_its_accuracy_target() -> None:
    result = fedcrypt.simulate(QUICKSTART)
    assert len(result.history) == 20
    assert all(r.status == "ok" and r.succeeded == 10 for r in result.history)
    assert result.final_accuracy >= 0.93


def test_same_seed_same_model_other_seed_other_model() -> None:
    job = fedcrypt.load_job(QUICKSTART).with_overrides(job={"rounds": 2})
    first, again, other = fedcrypt.simulate(job), fedcrypt.simulate(job), fedcrypt.simulate(job, seed=7)
    np.testing.assert_array_equal(first.params, again.params)
    assert not np.array_equal(first.params, other.params)


@pytest.mark.parametrize(
    "strategy",
    [
        {"name": "fedprox", "proximal_mu": 0.01},
        {"name": "fedadam", "server_lr": 0.01},
        {"name": "fedyogi", "server_lr": 0.01},
        {"name": "fedavg", "fraction_fit": 0.5, "min_fit_clients": 3, "weighting": "uniform"},
    ],
    ids=lambda s: str(s["name"]) + ("-sampled" if "fraction_fit" in s else ""),
)
def test_every_strategy_learns(strategy: dict[str, object]) -> None:
    job = fedcrypt.load_job(QUICKSTART).with_overrides(job={"rounds": 8}, strategy=strategy)
    result = fedcrypt.simulate(job)
    sampled = {r.sampled for r in result.history}
    assert sampled == ({5} if "fraction_fit" in strategy else {10})
    assert result.final_accuracy > 0.8


def test_any_module_factory_can_be_trained() -> None:
    def factory() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    job = fedcrypt.load_job(QUICKSTART).with_overrides(job={"rounds": 5})
    result = fedcrypt.simulate(job, model_factory=factory)
    assert result.spec.size == 64 * 32 + 32 + 32 * 10 + 10
    assert set(result.state_dict()) == {"1.weight", "1.bias", "3.weight", "3.bias"}
    assert result.final_accuracy > 0.8


def test_mnist_cnn_round_on_real_data() -> None:
    job = fedcrypt.JobConfig().with_overrides(
        job={"rounds": 1},
        data={"dataset": "mnist", "num_clients": 100, "partition": "iid"},
        model={"name": "cnn"},
        strategy={"fraction_fit": 0.02},
    )
    result = fedcrypt.simulate(job)
    (record,) = result.history
    assert record.status == "ok" and record.succeeded == 2
    assert record.bytes_up > 2 * 4 * 1_663_370
    assert record.accuracy > 0.3  # chance is 0.1; two clients with 600 examples each, one epoch


def test_aggregation_memory_is_one_update_not_one_per_client() -> None:
    """The server folds each reply in as it arrives, so its peak memory does not grow with clients."""
    size = 250_000  # 1 MB per float32 update
    mechanism = PlaintextMechanism()

    def peak_bytes(num_clients: int) -> int:
        rng = np.random.default_rng(0)
        clients = {
            f"c{i}": ScriptedClient(f"c{i}", rng.normal(size=size).astype(np.float32), 5, mechanism)
            for i in range(num_clients)
        }
        server = Server(
            job="test-job",
            strategy=FedAvg(),
            mechanism=mechanism,
            params=np.zeros(size, dtype=np.float32),
            transport=InProcessTransport(clients),  # type: ignore[arg-type]
        )
        tracemalloc.start()
        record = server.run_round(1)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert record.succeeded == num_clients
        return peak

    few, many = peak_bytes(3), peak_bytes(30)
    assert many < few + 2 * 4 * size  # 27 more clients cost less than two more updates
    assert many < 12 * 4 * size


def test_ckks_simulation_matches_plaintext_fedavg() -> None:
    job = fedcrypt.load_job(QUICKSTART).with_overrides(job={"rounds": 3})
    plain = fedcrypt.simulate(job)
    encrypted = fedcrypt.simulate(job.with_overrides(privacy={"mechanism": "ckks"}))
    assert all(r.status == "ok" and r.succeeded == 10 for r in encrypted.history)
    # CKKS adds ~1e-9 of noise per value and round; three rounds of momentum SGD keep it tiny.
    np.testing.assert_allclose(encrypted.params, plain.params, atol=1e-4)
    # Encrypted uploads are ~16 bytes per value against 4 in the clear.
    assert encrypted.history[0].bytes_up > 3 * plain.history[0].bytes_up


@pytest.mark.parametrize("selection", [{"encrypt_ratio": 0.1}, {"encrypt_layers": ["1.*"]}])
def test_selective_ckks_simulation_matches_plaintext_and_ships_less(selection: dict[str, object]) -> None:
    job = fedcrypt.load_job(QUICKSTART).with_overrides(job={"rounds": 3})
    plain = fedcrypt.simulate(job)
    full = fedcrypt.simulate(job.with_overrides(job={"rounds": 1}, privacy={"mechanism": "ckks"}))
    selective = fedcrypt.simulate(job.with_overrides(privacy={"mechanism": "ckks", **selection}))
    assert all(r.status == "ok" and r.succeeded == 10 for r in selective.history)
    np.testing.assert_allclose(selective.params, plain.params, atol=1e-4)
    fraction = selective.history[-1].mechanism["encrypted_fraction"]
    assert 0.1 <= fraction < 0.5
    assert selective.history[-1].bytes_up < full.history[0].bytes_up


def test_paillier_simulation_matches_plaintext_fedavg() -> None:
    job = fedcrypt.load_job(QUICKSTART).with_overrides(job={"rounds": 2}, model={"name": "logreg"})
    plain = fedcrypt.simulate(job)
    encrypted = fedcrypt.simulate(job.with_overrides(privacy={"mechanism": "paillier", "paillier_bits": 1024}))
    assert all(r.status == "ok" and r.succeeded == 10 for r in encrypted.history)
    np.testing.assert_allclose(encrypted.params, plain.params, atol=1e-5)
    assert encrypted.history[0].bytes_up > 50 * plain.history[0].bytes_up  # 256 bytes per value


def test_a_client_that_cannot_decrypt_is_skipped_for_the_next_one() -> None:
    job = load_job(QUICKSTART).with_overrides(
        job={"rounds": 1}, data={"num_clients": 3}, strategy={"min_fit_clients": 2}
    )
    dataset = load_dataset("digits")
    trainer = build_trainer(job, dataset)
    x, y = train_tensors(dataset)
    secret = SecretKey(PRESETS["fast"])
    stranger = SecretKey(PRESETS["fast"])
    mechanisms = {
        "a": CkksMechanism(stranger.public, stranger),  # another key: its upload is rejected, it cannot decrypt
        "b": CkksMechanism(secret.public, secret),
        "c": CkksMechanism(secret.public, secret),
    }
    parts = partition_clients(job, dataset)
    clients = {
        name: Client(name, job.job.name, trainer, ClientData(x, y, torch.from_numpy(part)), mechanisms[name])
        for name, part in zip("abc", parts)
    }
    before = trainer.initial_params()
    server = Server(
        job=job.job.name,
        strategy=FedAvg(min_fit_clients=2),
        mechanism=CkksMechanism(secret.public),
        params=before,
        transport=InProcessTransport(clients),
    )
    record = server.run_round(1)
    assert record.status == "ok" and record.succeeded == 2
    assert "fingerprint" in record.failures["a"]
    assert not np.array_equal(server.params, before)
    # If no survivor manages to decrypt, the round fails clearly and the model is unchanged.

    class Refusing(CkksMechanism):
        def recover(self, aggregate: object, ctx: object) -> np.ndarray:
            raise RecoveryError("key store locked")

    clients["b"].mechanism = clients["c"].mechanism = Refusing(secret.public, secret)
    after_first = server.params.copy()
    record = server.run_round(2)
    assert record.status == "failed" and "no surviving client could decrypt" in record.error
    assert "key store locked" in record.failures["b"] and "key store locked" in record.failures["c"]
    np.testing.assert_array_equal(server.params, after_first)


def test_batchcrypt_simulation_matches_plaintext_fedavg_at_plaintext_traffic() -> None:
    job = fedcrypt.load_job(QUICKSTART).with_overrides(job={"rounds": 2}, model={"name": "logreg"})
    plain = fedcrypt.simulate(job)
    packed = fedcrypt.simulate(job.with_overrides(privacy={"mechanism": "batchcrypt", "paillier_bits": 1024}))
    assert all(r.status == "ok" and r.succeeded == 10 for r in packed.history)
    np.testing.assert_allclose(packed.params, plain.params, atol=2e-3)  # 16-bit quantization
    assert packed.history[0].mechanism["batchcrypt_bytes_per_value"] < 4.5
    assert packed.history[0].bytes_up < 1.3 * plain.history[0].bytes_up  # ~4 bytes per value, like float32


def test_a_client_reporting_absurd_statistics_is_dropped_and_the_round_goes_on() -> None:
    from fedcrypt.crypto.paillier import generate_keypair
    from fedcrypt.mechanisms import BatchCryptMechanism

    job = load_job(QUICKSTART).with_overrides(job={"rounds": 1}, data={"num_clients": 3}, strategy={"min_fit_clients": 2})
    dataset = load_dataset("digits")
    trainer = build_trainer(job, dataset)
    x, y = train_tensors(dataset)
    public, private = generate_keypair(1024)

    class Boasting(BatchCryptMechanism):  # claims a range that would wreck everyone's quantization
        def client_round(self, ctx, client, local=None):  # type: ignore[no-untyped-def]
            honest = super().client_round(ctx, client, local)
            respond = honest.respond

            def boast(stage, request, contribution):  # type: ignore[no-untyped-def]
                reply = respond(stage, request, contribution)
                if stage == "stats":
                    reply.arrays["range"] = reply.arrays["range"] * 1e15
                return reply

            honest.respond = boast  # type: ignore[method-assign]
            return honest

    sizes = [t.numel for t in trainer.spec.tensors]
    mechanisms = {
        "a": Boasting(public, private, tensor_sizes=sizes),
        "b": BatchCryptMechanism(public, private, tensor_sizes=sizes),
        "c": BatchCryptMechanism(public, private, tensor_sizes=sizes),
    }
    clients = {
        name: Client(name, job.job.name, trainer, ClientData(x, y, torch.from_numpy(part)), mechanisms[name])
        for name, part in zip("abc", partition_clients(job, dataset))
    }
    before = trainer.initial_params()
    server = Server(
        job=job.job.name,
        strategy=FedAvg(min_fit_clients=2),
        mechanism=BatchCryptMechanism(public, tensor_sizes=sizes),
        params=before,
        transport=InProcessTransport(clients),
    )
    record = server.run_round(1)
    assert record.status == "ok" and record.succeeded == 2
    assert "absurd" in record.failures["a"]
    assert np.isfinite(server.params).all() and not np.array_equal(server.params, before)


def test_key_holders_decrypt_pieces_in_parallel_and_a_failed_piece_goes_to_another() -> None:
    from fedcrypt.crypto.paillier import generate_keypair
    from fedcrypt.mechanisms import PaillierMechanism

    job = load_job(QUICKSTART).with_overrides(
        job={"rounds": 1}, data={"num_clients": 3}, strategy={"min_fit_clients": 2}, model={"name": "logreg"}
    )
    dataset = load_dataset("digits")
    trainer = build_trainer(job, dataset)
    x, y = train_tensors(dataset)
    public, private = generate_keypair(1024)
    start = trainer.initial_params().copy()  # training moves the shared trainer's model
    decrypted: dict[str, int] = {}

    class Counting(PaillierMechanism):
        def recover(self, aggregate, ctx):  # type: ignore[no-untyped-def]
            return self.note(super().recover(aggregate, ctx))

        def note(self, values: np.ndarray) -> np.ndarray:
            decrypted[self.owner] = decrypted.get(self.owner, 0) + values.size
            return values

    class Refusing(Counting):
        def recover(self, aggregate, ctx):  # type: ignore[no-untyped-def]
            raise RecoveryError("key store locked")

    def run(kinds: dict[str, type]):  # type: ignore[no-untyped-def]
        clients = {}
        for name, part in zip("abc", partition_clients(job, dataset)):
            mechanism = kinds[name](public, private)
            mechanism.owner = name
            clients[name] = Client(name, job.job.name, trainer, ClientData(x, y, torch.from_numpy(part)), mechanism)
        server = Server(job=job.job.name, strategy=FedAvg(min_fit_clients=2), mechanism=PaillierMechanism(public),
                        params=start, transport=InProcessTransport(clients))
        record = server.run_round(1)
        return server.params, record

    honest, record = run({"a": Counting, "b": Counting, "c": Counting})
    size = trainer.spec.size + 1
    assert record.status == "ok" and set(decrypted) == {"a", "b", "c"}
    assert sum(decrypted.values()) == size and max(decrypted.values()) < size  # each decrypted one piece
    decrypted.clear()
    rerun, record = run({"a": Counting, "b": Refusing, "c": Counting})
    assert record.status == "ok" and "key store locked" in record.failures["b"]
    assert sum(decrypted.values()) == size and set(decrypted) == {"a", "c"}  # b's piece went to a survivor
    np.testing.assert_allclose(rerun, honest, atol=1e-6)


def _vanishing_secagg(stage: str):  # type: ignore[no-untyped-def]
    """A SecAgg+ client that answers every stage up to ``stage``, then never again."""
    from fedcrypt.mechanisms import SecAggMechanism

    class Vanishing(SecAggMechanism):
        def client_round(self, ctx, client, local=None):  # type: ignore[no-untyped-def]
            protector = super().client_round(ctx, client, local)
            respond = protector.respond

            def vanish(current, request, contribution):  # type: ignore[no-untyped-def]
                if current == stage:
                    raise RuntimeError("connection lost")
                return respond(current, request, contribution)

            protector.respond = vanish  # type: ignore[method-assign]
            return protector

    return Vanishing()


def _secagg_round(clients: int, vanishing: dict[str, str]):  # type: ignore[no-untyped-def]
    """One SecAgg+ round among ``clients`` clients on digits; ``vanishing`` maps a client to the
    stage at which it drops. Returns the record and the parameters before and after."""
    from fedcrypt.mechanisms import SecAggMechanism

    small = load_job(QUICKSTART).with_overrides(job={"rounds": 1}, data={"num_clients": clients},
                                                strategy={"min_fit_clients": 2})
    dataset = load_dataset("digits")
    trainer = build_trainer(small, dataset)
    x, y = train_tensors(dataset)
    mechanism = SecAggMechanism()
    names = "abcdefgh"[:clients]
    clients_by_name = {
        name: Client(name, small.job.name, trainer, ClientData(x, y, torch.from_numpy(part)),
                     _vanishing_secagg(vanishing[name]) if name in vanishing else mechanism)
        for name, part in zip(names, partition_clients(small, dataset))
    }
    before = trainer.initial_params().copy()
    server = Server(job=small.job.name, strategy=FedAvg(min_fit_clients=2), mechanism=mechanism, params=before,
                    transport=InProcessTransport(clients_by_name))
    return server.run_round(1), before, server.params


def test_secagg_simulation_equals_plaintext_fedavg_and_survives_dropouts() -> None:
    job = fedcrypt.load_job(QUICKSTART).with_overrides(job={"rounds": 2}, model={"name": "logreg"})
    plain = fedcrypt.simulate(job)
    masked = fedcrypt.simulate(job.with_overrides(privacy={"mechanism": "secagg", "neighbors": 4}))
    assert all(r.status == "ok" and r.succeeded == 10 for r in masked.history)
    assert masked.history[0].mechanism["secagg_neighbors"] == 4
    np.testing.assert_allclose(masked.params, plain.params, atol=1e-6)  # fixed point at 2^-24

    record, before, after = _secagg_round(4, {"d": "mask"})  # shares its secrets, never sends its vector
    assert record.status == "ok" and "connection lost" in record.failures["d"] and record.succeeded == 3
    assert record.mechanism["secagg_dropped_after_sharing"] == 1  # its pairwise masks were removed
    assert np.isfinite(after).all() and np.abs(after - before).max() < 5

    record, _, _ = _secagg_round(5, {"e": "unmask"})  # its masked vector is in the sum, then it drops
    assert record.status == "ok" and "connection lost" in record.failures["e"]
    assert record.succeeded == 5  # the sum holds five contributions, though four clients unmasked


def test_a_dp_job_reports_epsilon_per_round_and_stops_when_its_budget_is_spent(tmp_path: Path) -> None:
    job = fedcrypt.load_job(QUICKSTART).with_overrides(
        job={"rounds": 8},
        model={"name": "logreg"},
        strategy={"weighting": "uniform", "fraction_fit": 0.5, "min_fit_clients": 4},
        privacy={"mechanism": "secagg"},
        dp={"noise": "distributed", "clip_norm": 0.5, "noise_multiplier": 0.8, "target_epsilon": 12.0},
    )
    result = fedcrypt.simulate(job, out_dir=tmp_path / "run")
    assert "privacy budget spent" in result.stopped and 0 < len(result.history) < 8
    epsilons = [r.mechanism["dp_epsilon"] for r in result.history]
    assert epsilons == sorted(epsilons) and epsilons[-1] <= 12.0
    assert all(r.status == "ok" for r in result.history)
    again = fedcrypt.load_job(tmp_path / "run" / "job.toml")  # the run's resolved job keeps its [dp] section
    assert again.dp == job.dp


def test_adaptive_clipping_runs_end_to_end_and_moves_the_bound() -> None:
    job = fedcrypt.load_job(QUICKSTART).with_overrides(
        job={"rounds": 4},
        model={"name": "logreg"},
        strategy={"weighting": "uniform"},
        privacy={"mechanism": "batchcrypt", "paillier_bits": 1024},
        dp={"noise": "distributed", "clip_norm": 50.0, "noise_multiplier": 0.5, "adaptive": True, "count_noise": 0.5},
    )
    result = fedcrypt.simulate(job)
    assert all(r.status == "ok" and r.succeeded == 10 for r in result.history)
    bounds = [r.mechanism["dp_clip_norm"] for r in result.history]
    assert bounds[0] == 50.0 and bounds[-1] < bounds[0]  # every update is far below 50: the bound shrinks
    assert all(r.mechanism["dp_unclipped"] == 10 for r in result.history[:2])


def test_shares_simulation_equals_plaintext_fedavg_with_helpers_in_their_own_processes() -> None:
    job = fedcrypt.load_job(QUICKSTART).with_overrides(job={"rounds": 2}, model={"name": "logreg"})
    plain = fedcrypt.simulate(job)
    shared = fedcrypt.simulate(job.with_overrides(privacy={"mechanism": "shares", "aggregators": 3}))
    assert all(r.status == "ok" and r.succeeded == 10 for r in shared.history)
    assert shared.history[0].mechanism["shares_aggregators"] == 3
    np.testing.assert_allclose(shared.params, plain.params, atol=1e-6)  # fixed point at 2^-24
    # 8 bytes per value instead of 4, once per client (the helpers' shares travel as 60-byte seeds),
    # plus the helpers' partial sums: well under the 6x of sending every aggregator a full share
    assert shared.history[0].bytes_up < 3 * plain.history[0].bytes_up


def test_a_helper_process_that_dies_fails_its_rounds_cleanly_and_keeps_the_model() -> None:
    import os
    import signal

    from fedcrypt.aggregator import start_helpers
    from fedcrypt.mechanisms import simulation_mechanisms

    job = load_job(QUICKSTART).with_overrides(
        job={"rounds": 2}, data={"num_clients": 3}, strategy={"min_fit_clients": 2},
        privacy={"mechanism": "shares", "aggregators": 3},
    )
    dataset = load_dataset("digits")
    trainer = build_trainer(job, dataset)
    x, y = train_tensors(dataset)
    helpers, keys = start_helpers(job, None)
    try:
        assert os.getpid() not in helpers.pids().values()
        server_side, client_side = simulation_mechanisms("shares", key_dir=None, options=job.privacy.options, helper_keys=keys)
        with pytest.raises(ValueError, match="holds no helper aggregator key"):  # the secrets live in the helpers
            server_side.helper_round(job.job.name, 1, "aggregator-1")
        clients = {
            name: Client(name, job.job.name, trainer, ClientData(x, y, torch.from_numpy(part)), client_side)
            for name, part in zip("abc", partition_clients(job, dataset))
        }
        server = Server(job=job.job.name, strategy=FedAvg(min_fit_clients=2), mechanism=server_side,
                        params=trainer.initial_params(), transport=InProcessTransport(clients), helpers=helpers)
        assert server.run_round(1).status == "ok"
        before = server.params.copy()
        os.kill(helpers.pids()["aggregator-2"], signal.SIGKILL)
        record = server.run_round(2)
        assert record.status == "failed" and "aggregator-2 did not answer the 'open' stage" in record.error
        assert "aggregator-2" in record.failures
        np.testing.assert_array_equal(server.params, before)
        assert server.shutdown() == ["a", "b", "c", "aggregator-1"]
    finally:
        helpers.close()
    with pytest.raises(ValueError, match="needs its helper aggregators"):
        Server(job="j", strategy=FedAvg(), mechanism=server_side, params=before, transport=InProcessTransport({}))


def test_distributed_dp_noise_composes_with_additive_shares() -> None:
    job = fedcrypt.load_job(QUICKSTART).with_overrides(
        job={"rounds": 2},
        model={"name": "logreg"},
        strategy={"weighting": "uniform", "min_fit_clients": 5},
        privacy={"mechanism": "shares"},
        dp={"noise": "distributed", "clip_norm": 0.5, "noise_multiplier": 0.6},
    )
    result = fedcrypt.simulate(job)
    assert all(r.status == "ok" and r.succeeded == 10 for r in result.history)
    epsilons = [r.mechanism["dp_epsilon"] for r in result.history]
    assert 0 < epsilons[0] < epsilons[1] and result.history[0].mechanism["shares_aggregators"] == 2
    assert np.isfinite(result.params).all()
