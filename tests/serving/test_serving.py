"""`fedcrypt serve`: a finished run's model answers /predict exactly as model.pt loaded by hand,
its accuracy on the test set is the run's own, and malformed requests get a 4xx naming the
problem while the server goes on answering."""

from __future__ import annotations

import json
import pickle
import secrets
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from fedcrypt.config.job import load_job
from fedcrypt.data import load_dataset
from fedcrypt.models.zoo import build_model
from fedcrypt.serving import ServingError, create_app, load_served_model
from fedcrypt.serving.http import HttpServer
from fedcrypt.simulation import simulate
from fedcrypt.transport.certs import write_bundle

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("served") / "run"
    job = load_job(REPO / "examples" / "quickstart.toml").with_overrides(job={"rounds": 3})
    simulate(job, out_dir=out)
    return out


@pytest.fixture(scope="module")
def client(run_dir: Path) -> TestClient:
    return TestClient(create_app(load_served_model(run_dir), max_batch=512))


def _by_hand(run_dir: Path, inputs: np.ndarray) -> np.ndarray:
    """model.pt loaded into the job's model without fedcrypt.serving: the oracle."""
    job = load_job(run_dir / "job.toml")
    model = build_model(job.model.name, (1, 8, 8), 10, hidden=job.model.hidden)
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(inputs)), dim=1).numpy()


def test_predictions_equal_model_pt_loaded_by_hand(client: TestClient, run_dir: Path) -> None:
    inputs = np.array(load_dataset("digits").x_test[:32])
    answer = client.post("/predict", json={"inputs": inputs.tolist()})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected = _by_hand(run_dir, inputs)
    np.testing.assert_allclose(body["probabilities"], expected, atol=2e-6)
    assert body["predictions"] == expected.argmax(axis=1).tolist()
    assert body["labels"] == [str(c) for c in body["predictions"]]
    flat = client.post("/predict", json={"inputs": inputs.reshape(32, -1)[:1].tolist()})
    assert flat.json()["probabilities"] == body["probabilities"][:1]  # flat inputs are reshaped


def test_served_accuracy_is_the_runs_final_accuracy(client: TestClient, run_dir: Path) -> None:
    dataset = load_dataset("digits")
    answer = client.post("/predict", json={"inputs": np.array(dataset.x_test).tolist()})
    accuracy = float(np.mean(np.array(answer.json()["predictions"]) == dataset.y_test))
    final = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["accuracy"]
    assert accuracy == pytest.approx(final, abs=1e-9)


def test_metadata_and_health(client: TestClient, run_dir: Path) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    meta = client.get("/metadata").json()
    assert meta["model"]["model"] == "mlp" and meta["model"]["input_shape"] == [1, 8, 8]
    assert meta["model"]["class_names"] == [str(d) for d in range(10)] and meta["input"]["flat_length"] == 64
    run = meta["run"]
    final = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert (run["job"], run["mechanism"], run["rounds"], run["accuracy"]) == ("quickstart", "none", 3, final["accuracy"])
    assert meta["max_batch"] == 512


GOOD = [[0.5] * 64]


@pytest.mark.parametrize(("body", "status", "message"), [
    (b"not json", 400, "not valid JSON"),
    (b'{"inputs": [[NaN]]}', 400, "NaN is not a number JSON allows"),
    (b"[1, 2]", 422, 'body must be a JSON object {"inputs"'),
    (json.dumps({"input": GOOD}).encode(), 422, 'body must be a JSON object {"inputs"'),
    (json.dumps({"inputs": GOOD, "extra": 1}).encode(), 422, "unknown field(s) 'extra'"),
    (json.dumps({"inputs": []}).encode(), 422, "non-empty list"),
    (json.dumps({"inputs": "0.5"}).encode(), 422, "non-empty list"),
    (json.dumps({"inputs": [[0.5] * 64, [0.5] * 63]}).encode(), 422, "same shape"),
    (json.dumps({"inputs": [["0.5"] * 64]}).encode(), 422, "only numbers"),
    (json.dumps({"inputs": [[True] + [0.5] * 63]}).encode(), 422, "only numbers"),
    (json.dumps({"inputs": [[None] * 64]}).encode(), 422, "only numbers"),
    (json.dumps({"inputs": [[0.5] * 63]}).encode(), 422, "shape [1, 8, 8] or be 64 numbers; got a batch of shape [1, 63]"),
    (json.dumps({"inputs": [0.5] * 64}).encode(), 422, "got a batch of shape [64]"),
    (json.dumps({"inputs": [[1e39] * 64]}).encode(), 422, "finite float32"),
    (json.dumps({"inputs": GOOD * 513}).encode(), 413, "at most 512 per request"),
])
def test_malformed_requests_get_a_4xx_naming_the_problem(client: TestClient, body: bytes, status: int,
                                                         message: str) -> None:
    answer = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status and message in answer.json()["error"]
    assert client.post("/predict", json={"inputs": GOOD}).status_code == 200  # still serving


def test_an_oversized_body_is_refused_before_it_is_read(run_dir: Path) -> None:
    small = TestClient(create_app(load_served_model(run_dir), max_body_bytes=1000))
    answer = small.post("/predict", json={"inputs": [[0.123456789] * 64] * 4})
    assert answer.status_code == 413 and "exceeds the limit of 1000 bytes" in answer.json()["error"]
    assert small.get("/predict").status_code == 405


def test_unservable_folders_are_named(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ServingError, match="no such directory"):
        load_served_model(tmp_path / "missing")
    with pytest.raises(ServingError, match="has no model.pt"):
        load_served_model(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "model.json").write_text('{"model": "mlp", "input_shape": [1, 8, 8], "num_classes": 10}')
    with pytest.raises(ServingError, match="class_names must be 10 strings"):
        load_served_model(broken)
    spec = json.loads((run_dir / "model.json").read_text())
    (broken / "model.json").write_text(json.dumps({**spec, "hidden": [32]}))
    with pytest.raises(ServingError, match="does not hold the weights of the mlp model"):
        load_served_model(broken)
    for garbage in (secrets.token_bytes(100), b"PK\x03\x04 not a zip", pickle.dumps({"weights": object()})):
        (broken / "model.pt").write_bytes(garbage)
        with pytest.raises(ServingError, match="is not a file of saved weights"):
            load_served_model(broken)


def test_a_run_without_model_json_is_served_from_its_job(run_dir: Path, tmp_path: Path) -> None:
    older = tmp_path / "older"
    shutil.copytree(run_dir, older)
    (older / "model.json").unlink()
    inputs = np.array(load_dataset("digits").x_test[:4])
    np.testing.assert_allclose(load_served_model(older).predict(inputs), _by_hand(run_dir, inputs), atol=1e-6)


def test_fedcrypt_serve_listens_and_refuses_bad_folders(
        run_dir: Path, tmp_path: Path, fedcrypt_listening: Callable[[list[str]], AbstractContextManager[str]]) -> None:
    with fedcrypt_listening(["serve", str(run_dir)]) as url:
        with urllib.request.urlopen(url + "/health", timeout=10) as answer:
            assert json.load(answer) == {"status": "ok"}
    missing = subprocess.run([sys.executable, "-m", "fedcrypt.cli", "serve", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no such directory" in missing.stderr and "Traceback" not in missing.stderr


def test_https_with_certificates_from_fedcrypt_certs(run_dir: Path, tmp_path: Path) -> None:
    write_bundle(tmp_path, ["client"])
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    app = create_app(load_served_model(run_dir))
    with HttpServer(app, certfile=str(tmp_path / "server.pem"), keyfile=str(tmp_path / "server.key")) as server:
        assert server.url.startswith("https://127.0.0.1:")
        with urllib.request.urlopen(server.url + "/health", timeout=10, context=context) as answer:
            assert json.load(answer) == {"status": "ok"}
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(server.url + "/health", timeout=10, context=ssl.create_default_context())
