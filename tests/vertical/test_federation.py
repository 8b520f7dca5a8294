"""A vertical job across parties: PSI, split, training and scoring driven by the guest over a
transport, against the in-process estimators (same weights, same trees), separate processes over
gRPC with TLS, parties that refuse or drop out, and jobs and files that are wrong."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedcrypt.config.job import JobError
from fedcrypt.config.vertical import VerticalJob, load_vertical_job, parse_vertical_job
from fedcrypt.core.messages import ErrorReply, JobSpec, Payload, StageIns, from_bytes, to_bytes
from fedcrypt.core.wire import LAZY_BLOB_BYTES, SpooledMessage
from fedcrypt.transport.certs import server_files, write_bundle
from fedcrypt.transport.inprocess import InProcessTransport
from fedcrypt.vertical import hetero_lr, secureboost
from fedcrypt.vertical.data import PartyData, VerticalDataError, align, breast_cancer_split, load_party_csv
from fedcrypt.vertical.federation import Party, Peers, VerticalError, lead, load_guest_data, load_host_data
from fedcrypt.vertical.network import (
    _check_same_job,
    join_party,
    psi_connect,
    psi_listen,
    run_in_process,
    run_processes,
    serve_guest,
)
from fedcrypt.vertical.psi import PsiParty

BITS = 1024


def _write_job(folder: Path, algorithm: str = "hetero_lr", **changes: dict[str, Any]) -> Path:
    """A job over the breast-cancer split in ``folder`` (CSV files written once per folder)."""
    if not (folder / "guest.csv").exists():
        breast_cancer_split(folder)
    sections: dict[str, dict[str, Any]] = {
        "vertical": {"name": "bc", "algorithm": algorithm}, "guest": {"data": "guest.csv"},
        "hetero_lr": {"key_bits": BITS, "epochs": 3}, "secureboost": {"key_bits": BITS, "n_trees": 3},
    }
    for name, values in changes.items():
        sections[name] = {**sections.get(name, {}), **values}
    text = "".join(f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
                   for name, values in sections.items())
    path = folder / f"{algorithm}.toml"
    path.write_text(text + '[[hosts]]\nname = "host-0"\ndata = "host.csv"\n')
    return path


def _split_of(folder: Path) -> tuple[dict[str, PartyData], dict[str, PartyData]]:
    """The guest's and host's train/test rows of a finished run, rebuilt from the CSVs and the
    split the run made (sorted common IDs, permuted with the job seed), for the oracles."""
    guest, host = load_party_csv(folder / "guest.csv", "id", "label"), load_party_csv(folder / "host.csv", "id")
    common = sorted(set(guest.ids) & set(host.ids))
    order = np.random.default_rng(0).permutation(len(common))
    test = set(order[: round(0.2 * len(common))].tolist())
    ids = {"train": [c for i, c in enumerate(common) if i not in test], "test": [c for i, c in enumerate(common) if i in test]}
    return ({k: align(guest, v) for k, v in ids.items()}, {k: align(host, v) for k, v in ids.items()})


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vertical")
    breast_cancer_split(path)
    return path


def test_hetero_lr_run_equals_the_in_process_estimator(folder: Path, tmp_path: Path) -> None:
    job = load_vertical_job(_write_job(folder))
    result = run_in_process(job, tmp_path / "out")
    guest_rows, host_rows = _split_of(folder)
    oracle = hetero_lr.HeteroLR(epochs=3, key_bits=BITS, random_state=0).fit(guest_rows["train"], [host_rows["train"]])

    guest_model = json.loads((tmp_path / "out" / "guest" / "model.json").read_text())
    host_model = json.loads((tmp_path / "out" / "host-0" / "model.json").read_text())
    np.testing.assert_allclose(guest_model["weights"], oracle.guest_.weights, atol=1e-12)
    assert guest_model["intercept"] == pytest.approx(oracle.guest_.intercept, abs=1e-12)
    np.testing.assert_allclose(host_model["weights"], oracle.hosts_[0].weights, atol=1e-12)
    p = oracle.predict_proba(guest_rows["test"], [host_rows["test"]])[:, 1]
    assert result.metrics["test"]["accuracy"] == pytest.approx(np.mean((p >= 0.5) == guest_rows["test"].labels))
    assert result.rows == {"guest": 512, "common": 455, "train": 364, "test": 91}
    assert result.metrics["test"]["accuracy"] > 0.9
    for part in ("guest", "host-0"):
        assert stat.S_IMODE((tmp_path / "out" / part / "model.json").stat().st_mode) == 0o600
    saved = json.loads((tmp_path / "out" / "guest" / "metrics.json").read_text())
    assert saved["metrics"] == result.metrics and saved["bytes_sent"] > 0


def test_secureboost_run_equals_the_in_process_estimator(folder: Path, tmp_path: Path) -> None:
    job = load_vertical_job(_write_job(folder, "secureboost"))
    result = run_in_process(job, tmp_path / "out")
    guest_rows, host_rows = _split_of(folder)
    oracle = secureboost.SecureBoost(n_trees=3, key_bits=BITS).fit(
        guest_rows["train"].features, guest_rows["train"].labels, [host_rows["train"].features])
    p = oracle.predict_proba(guest_rows["test"].features, [host_rows["test"].features])[:, 1]
    # Host candidates whose splits tie on the training rows are taken in a random order (it hides
    # which feature a candidate is), so two runs may differ there: compare scores, not bits.
    assert result.metrics["test"]["auc"] == pytest.approx(roc_auc_score(guest_rows["test"].labels, p), abs=0.02)
    assert result.metrics["test"]["auc"] > 0.97
    host_model = json.loads((tmp_path / "out" / "host-0" / "model.json").read_text())
    guest_model = json.loads((tmp_path / "out" / "guest" / "model.json").read_text())
    host_nodes = [node for tree in guest_model["trees"] for node in tree if node["owner"] == 0]
    assert len(host_model["records"]) == len(host_nodes) > 0  # thresholds only in the host's file
    assert all(node["threshold"] is None for node in host_nodes)


def test_separate_processes_over_grpc_give_the_same_model(folder: Path, tmp_path: Path) -> None:
    path = _write_job(folder)
    in_process = run_in_process(load_vertical_job(path), tmp_path / "a")
    separate = run_processes(path, tmp_path / "b")
    assert separate.metrics == in_process.metrics
    for part in ("guest", "host-0"):
        a = json.loads((tmp_path / "a" / part / "model.json").read_text())
        b = json.loads((tmp_path / "b" / part / "model.json").read_text())
        assert a == b
    assert not (tmp_path / "b" / "arbiter" / "model.json").exists()  # the arbiter keeps nothing


def test_psi_false_needs_the_same_ids_everywhere(folder: Path, tmp_path: Path) -> None:
    guest, host = load_party_csv(folder / "guest.csv", "id", "label"), load_party_csv(folder / "host.csv", "id")
    common = sorted(set(guest.ids) & set(host.ids))
    for name, party in (("guest", guest), ("host", host)):
        rows = align(party, common[::-1] if name == "host" else common)  # same IDs, another order
        columns = ["id", *(["label"] if name == "guest" else []), *party.feature_names]
        lines = [",".join(columns)] + [
            ",".join([i, *([repr(float(rows.labels[r]))] if name == "guest" else []), *map(repr, rows.features[r].tolist())])
            for r, i in enumerate(rows.ids)]
        (tmp_path / f"{name}.csv").write_text("\n".join(lines) + "\n")
    job = load_vertical_job(_write_job(tmp_path, vertical={"psi": False}))
    assert run_in_process(job, tmp_path / "ok").rows["common"] == len(common)

    (tmp_path / "host.csv").write_text((folder / "host.csv").read_text())  # other IDs
    with pytest.raises(VerticalError, match="host-0 failed at step align: .*every file must hold the same IDs"):
        run_in_process(job, tmp_path / "bad")
    assert not (tmp_path / "bad" / "guest" / "model.json").exists()


class _Crashing(Party):
    """A host that dies at its ``crash_at``-th forward step."""

    crash_at = 3

    def handle(self, request: Any) -> list[memoryview]:
        message = from_bytes(request).message
        if isinstance(message, StageIns) and message.stage == "hetero_lr.forward":
            self.crash_at -= 1
            if self.crash_at == 0:
                raise ConnectionResetError("host went away")
        return super().handle(request)


def test_a_party_dropping_mid_training_fails_the_run_cleanly(folder: Path, tmp_path: Path) -> None:
    job = load_vertical_job(_write_job(folder))
    host = _Crashing("host-0", load_host_data(job, "host-0"), job=job, out_dir=tmp_path / "host-0")
    arbiter = Party("arbiter", None, job=job)
    peers = Peers(InProcessTransport({"host-0": host, "arbiter": arbiter}), "bc")
    with pytest.raises(VerticalError, match="host-0 failed at step hetero_lr.forward: client crashed"):
        lead(job, load_guest_data(job), peers, tmp_path / "guest")
    assert not (tmp_path / "guest" / "model.json").exists() and not (tmp_path / "host-0" / "model.json").exists()
    assert arbiter.finished  # told to stop


def test_a_host_process_killed_mid_training_stops_the_guest(folder: Path, tmp_path: Path) -> None:
    path = _write_job(folder, deploy={"liveness_timeout": 2.0, "wait_timeout": 60.0})
    job = load_vertical_job(path)
    write_bundle(tmp_path / "certs", job.peers, days=1)
    ports: list[int] = []
    listening = threading.Event()
    children: list[subprocess.Popen[bytes]] = []

    def start_parties(port: int) -> None:
        ports.append(port)
        for name in job.peers:
            children.append(subprocess.Popen(
                [sys.executable, "-m", "fedcrypt.vertical.network", str(path), "--role", name, "--connect",
                 f"127.0.0.1:{port}", "--certs", str(tmp_path / "certs"), "--out", str(tmp_path / name)],
                stderr=subprocess.DEVNULL))
        listening.set()

    def kill_host(phase: str, done: int, total: int) -> None:
        if phase == "train" and done == 5:
            os.kill(children[0].pid, signal.SIGKILL)

    try:
        with pytest.raises(VerticalError, match="host-0 failed at step hetero_lr"):
            serve_guest(job, load_guest_data(job), address="127.0.0.1:0", tls=server_files(tmp_path / "certs"),
                        out_dir=tmp_path / "guest", progress=kill_host, on_listening=start_parties)
        assert children[1].wait(timeout=30) == 0  # the arbiter was told to stop and ended cleanly
    finally:
        for child in children:
            child.kill()
            child.wait()
    assert not (tmp_path / "guest" / "model.json").exists()


def test_a_party_refuses_what_is_not_its_guests(folder: Path, tmp_path: Path) -> None:
    job = load_vertical_job(_write_job(folder))
    host = Party("host-0", load_host_data(job, "host-0"), job=job)

    def ask(message: Any, job_name: str = "bc", sender: str = "guest") -> Any:
        return from_bytes(b"".join(host.handle(to_bytes(message, job=job_name, sender=sender)))).message

    assert "not a request of the guest" in ask(StageIns(1, "align", Payload()), sender="host-1").reason
    assert "not a request of the guest" in ask(StageIns(1, "align", Payload()), job_name="other").reason
    assert "has no step 'steal'" in ask(StageIns(1, "steal", Payload())).reason
    assert "before" in ask(StageIns(1, "hetero_lr.forward", Payload())).reason  # out of order
    assert isinstance(ask(StageIns(1, "hetero_lr.share.test", Payload())), ErrorReply)
    assert "undecodable" in from_bytes(b"".join(host.handle(b"garbage"))).message.reason
    with pytest.raises(VerticalDataError, match="only the guest may hold them"):
        Party("host-0", load_guest_data(job), job=job)
    with pytest.raises(JobError, match="no host 'host-9'"):
        Party("host-9", load_host_data(job, "host-0"), job=job)


def test_a_party_refuses_a_guest_with_another_job(folder: Path) -> None:
    ours = load_vertical_job(_write_job(folder))
    theirs = ours.model_copy(update={"hetero_lr": ours.hetero_lr.model_copy(update={"epochs": 50})})
    welcome = to_bytes(JobSpec(theirs.to_toml()),
                       job="bc", sender="guest")
    with pytest.raises(VerticalError, match=r"differs from ours at hetero_lr.epochs \(ours 3, the guest's 50\)"):
        _check_same_job(ours, welcome)
    moved = ours.model_copy(update={"guest": ours.guest.model_copy(update={"data": "/elsewhere/guest.csv"})})
    _check_same_job(ours, to_bytes(JobSpec(
        moved.to_toml()), job="bc", sender="guest"))  # data paths are each party's own


def test_an_old_model_is_never_overwritten(folder: Path, tmp_path: Path) -> None:
    job = load_vertical_job(_write_job(folder))
    (tmp_path / "out" / "host-0").mkdir(parents=True)
    (tmp_path / "out" / "host-0" / "model.json").write_text("{}")
    with pytest.raises(VerticalDataError, match="already holds a model"):
        run_in_process(job, tmp_path / "out")
    assert (tmp_path / "out" / "host-0" / "model.json").read_text() == "{}"


@pytest.mark.parametrize(("change", "message"), [
    ({"hosts": [{"name": "guest", "data": "h.csv"}]}, "a host cannot be named 'guest'"),
    ({"hosts": [{"name": "a", "data": "h.csv"}, {"name": "a", "data": "i.csv"}]}, "repeated: a"),
    ({"hosts": []}, "hosts"),
    ({"vertical": {"algorithm": "forest"}}, "vertical.algorithm"),
    ({"vertical": {"test_fraction": 1.0}}, "vertical.test_fraction"),
    ({"hetero_lr": {"key_bits": 512}}, "hetero_lr.key_bits"),
    ({"secureboost": {"max_dept": 3}}, "secureboost.max_dept: unknown key"),
])
def test_bad_job_files_name_the_key(change: dict[str, Any], message: str) -> None:
    raw: dict[str, Any] = {"guest": {"data": "g.csv"}, "hosts": [{"name": "host-0", "data": "h.csv"}], **change}
    with pytest.raises(JobError, match=message):
        parse_vertical_job(raw)


def test_job_round_trips_through_toml(folder: Path) -> None:
    job = load_vertical_job(_write_job(folder))
    again = parse_vertical_job(tomllib.loads(job.to_toml()), source_dir=folder)
    assert again == job and isinstance(again, VerticalJob)


def test_psi_over_grpc_both_sides_get_the_intersection_in_the_same_order() -> None:
    a = [f"user-{i}" for i in range(0, 300)]
    b = [f"user-{i}" for i in range(200, 450)][::-1]
    got: dict[str, list[str]] = {}
    ready = threading.Event()
    port: list[int] = []

    def listen() -> None:
        got["a"] = psi_listen(a, address="127.0.0.1:0", tls=None, peer="bank", wait_timeout=30, workers=1,
                              on_listening=lambda p: (port.append(p), ready.set()))

    thread = threading.Thread(target=listen)
    thread.start()
    assert ready.wait(30)
    got["b"] = psi_connect(b, address=f"127.0.0.1:{port[0]}", name="bank", tls=None, workers=1)
    thread.join(30)
    assert got["a"] == got["b"] and sorted(got["a"]) == sorted(set(a) & set(b))


def test_join_party_refuses_to_play_the_guest(folder: Path) -> None:
    job = load_vertical_job(_write_job(folder))
    with pytest.raises(VerticalError, match="the guest listens"):
        join_party(job, "guest", address="127.0.0.1:1", tls=None, out_dir=None)


def test_missing_data_file_is_a_clear_error(tmp_path: Path) -> None:
    job = parse_vertical_job({"guest": {"data": "none.csv"}, "hosts": [{"name": "h", "data": "x.csv"}]},
                             source_dir=tmp_path)
    with pytest.raises(VerticalDataError, match="none.csv: cannot read: No such file"):
        load_guest_data(job)



def test_a_host_keeps_the_guests_points_past_a_spooled_request(tmp_path: Path) -> None:
    """Large requests arrive in a temporary file closed after ``handle``: the PSI points the host
    needs at the next step must have been read into memory."""
    ids = [f"id-{i}" for i in range(LAZY_BLOB_BYTES // 32 + 10)]  # blinded points over the lazy size
    guest = PsiParty(ids[5:], workers=1)
    job = parse_vertical_job({"guest": {"data": "g.csv"}, "hosts": [{"name": "host-0", "data": "h.csv"}]})
    host = Party("host-0", PartyData(tuple(ids), np.zeros((len(ids), 1)), ("x",)), job=job, workers=1)

    def ask(stage: str, payload: Payload) -> Payload:
        spooled = SpooledMessage()
        spooled.write(to_bytes(StageIns(1, stage, payload), job=job.vertical.name, sender="guest"))
        reply = from_bytes(b"".join(host.handle(spooled))).message
        spooled.close()
        assert not isinstance(reply, ErrorReply), reply
        return reply.payload

    theirs = ask("psi.blinded", guest.blinded())
    reply = guest.double_blind(theirs)
    own = ask("psi.double", reply)
    assert host.intersection == guest.intersection(own, reply) and len(host.intersection) == len(ids) - 5
