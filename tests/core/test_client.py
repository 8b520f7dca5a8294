from __future__ import annotations

import numpy as np
import torch

from fedcrypt.core.client import Client, client_seed
from fedcrypt.core.messages import ErrorReply, FitIns, FitRes, Shutdown, StageIns, Payload, from_bytes, to_bytes
from fedcrypt.mechanisms.plaintext import PlaintextMechanism
from fedcrypt.models.training import ClientData, LocalTrainer, TrainConfig
from fedcrypt.models.zoo import MLP


def _client() -> Client:
    torch.manual_seed(0)
    x = torch.randn(40, 4)
    y = (x[:, 0] > 0).long()
    trainer = LocalTrainer(MLP(4, 2, (8,)), TrainConfig(batch_size=8, lr=0.1))
    return Client("alice", "job", trainer, ClientData.whole(x, y), PlaintextMechanism(), seed=1)


def _ask(client: Client, message: object, job: str = "job") -> object:
    return from_bytes(b"".join(client.handle(to_bytes(message, job=job, sender="server")))).message  # type: ignore[arg-type]


def test_fit_returns_the_weighted_delta_and_its_weight() -> None:
    client = _client()
    params = client.trainer.initial_params()
    reply = _ask(client, FitIns(1, params, {"weighting": "samples"}, ("alice", "bob")))
    assert isinstance(reply, FitRes) and reply.num_examples == 40
    vector = reply.payload.arrays["vector"]
    assert vector.shape == (params.shape[0] + 1,) and vector[-1] == 40.0
    assert np.abs(vector[:-1]).max() > 0  # training moved the model
    assert {"train_loss", "train_seconds", "protect_seconds"} <= reply.metrics.keys()
    uniform = _ask(_client(), FitIns(1, params, {"weighting": "uniform"}, ("alice",)))
    assert isinstance(uniform, FitRes)
    np.testing.assert_allclose(uniform.payload.arrays["vector"][:-1] * 40, vector[:-1], rtol=1e-4, atol=1e-6)


def test_training_is_reproducible_per_round_and_client() -> None:
    params = _client().trainer.initial_params()
    first = _ask(_client(), FitIns(2, params, {}, ("alice",)))
    second = _ask(_client(), FitIns(2, params, {}, ("alice",)))
    assert isinstance(first, FitRes) and isinstance(second, FitRes)
    np.testing.assert_array_equal(first.payload.arrays["vector"], second.payload.arrays["vector"])
    assert client_seed(0, 1, "a") != client_seed(0, 2, "a") != client_seed(0, 1, "b")


def test_refusals_come_back_as_error_replies() -> None:
    client = _client()
    size = client.trainer.spec.size
    assert isinstance(_ask(client, FitIns(1, np.zeros(size, np.float32), {}, ()), job="other"), ErrorReply)
    wrong_size = _ask(client, FitIns(1, np.zeros(size + 1, np.float32), {}, ()))
    assert isinstance(wrong_size, ErrorReply) and "no model of size" in wrong_size.reason
    bad_mu = _ask(client, FitIns(1, np.zeros(size, np.float32), {"proximal_mu": -1.0}, ()))
    assert isinstance(bad_mu, ErrorReply) and "proximal_mu" in bad_mu.reason
    early = _ask(client, StageIns(1, "unmask", Payload()))
    assert isinstance(early, ErrorReply) and "without a fit" in early.reason
    garbage = from_bytes(b"".join(client.handle(b"FCM1\xff\xff"))).message
    assert isinstance(garbage, ErrorReply) and "undecodable" in garbage.reason


def test_shutdown_finishes_the_client() -> None:
    client = _client()
    assert isinstance(_ask(client, Shutdown()), Shutdown) and client.finished
