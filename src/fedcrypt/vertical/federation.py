"""A vertical job across parties: the guest drives the protocol, the other parties answer it.

The guest holds the labels, so it runs the drivers (PSI, :func:`hetero_lr.train`,
:func:`secureboost.train`) and is the one party that needs a reachable address. Hosts and the
arbiter are :class:`Party` responders: every request is a ``StageIns`` whose stage names a step of
their role (``hetero_lr.forward``, ``secureboost.histograms`` ...) and every reply a ``StageRes``
with that step's payload, or an ``ErrorReply`` saying why the party refused. The guest reaches
them through :class:`Peers`; the role proxies (``RemoteLRHost`` ...) give the drivers the same
methods as the in-process roles, so one driver serves both. The bytes are the same whether the
parties share a process (:class:`~fedcrypt.transport.inprocess.InProcessTransport`) or talk gRPC
(the guest a :class:`~fedcrypt.transport.grpc_server.GrpcServerTransport`, the parties pulling
like clients), as in horizontal FL.

A run: PSI with each host (or, with ``psi = false``, a check that every file holds the same IDs);
the guest splits the common rows into train and test and sends each host the row numbers
(positions in the list both sides hold, never IDs); training; scoring of both splits; each party
writes its own part of the model (0600); the guest writes the metrics.

Host <-> arbiter messages pass through the guest: they are Paillier ciphertexts and values under
one-time pads in ``Z_n``, so relaying them shows the guest nothing (see :mod:`hetero_lr`).

A party that stops answering (crashed, disconnected, past its deadline) or refuses a step ends
the run: the guest raises :class:`VerticalError` naming the party and the step, tells the others
to stop, and writes no model. Training is not resumed; the job is rerun.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

from fedcrypt.config.vertical import ARBITER, GUEST, VerticalJob
from fedcrypt.core.messages import ErrorReply, Message, Payload, Shutdown, StageIns, StageRes, from_bytes, to_parts
from fedcrypt.core.transport import Inbound, Transport
from fedcrypt.core.wire import WireError
from fedcrypt.crypto.keyfiles import write_secret
from fedcrypt.crypto.paillier import PaillierError
from fedcrypt.vertical import hetero_lr, secureboost
from fedcrypt.vertical.data import PartyData, VerticalDataError, align, load_party_csv
from fedcrypt.vertical.psi import PsiParty

log = logging.getLogger(__name__)

#: ``progress(phase, done, total)``: phases "psi", "train", "score".
Progress = Callable[[str, int, int], None]
SPLITS = ("train", "test")
#: What a refusing party may raise; anything else is a bug and propagates.
_REFUSALS = (ValueError, PaillierError, OverflowError)
#: The job name of a bare ``fedcrypt psi`` run.
PSI_JOB = "fedcrypt-psi"


class VerticalError(Exception):
    """The run cannot go on: a party refused a step or dropped out; the message names it."""


# --- the guest's side ------------------------------------------------------------------------


class Peers:
    """The guest's line to the other parties: one step with one party at a time.

    Replies are read into memory before the transport releases them (a large one may arrive in a
    temporary file). Counts the bytes sent and received.
    """

    def __init__(self, transport: Transport, job: str) -> None:
        self.transport = transport
        self.job = job
        self.bytes_sent = 0
        self.bytes_received = 0
        self._sequence = 0

    def call(self, party: str, stage: str, payload: Payload | None = None) -> Payload:
        """Send ``party`` a step and return its answer; :class:`VerticalError` if it refuses or drops."""
        self._sequence += 1
        sequence = self._sequence
        request = to_parts(StageIns(sequence, stage, payload or Payload()), job=self.job, sender=GUEST)
        self.bytes_sent += sum(len(part) for part in request)
        answers: list[Payload] = []
        failures: list[str] = []

        def on_reply(name: str, data: Inbound) -> None:
            self.bytes_received += len(data)
            try:
                received = from_bytes(data)
            except WireError as exc:
                failures.append(f"sent an undecodable reply ({exc})")
                return
            message = received.message
            if received.job != self.job or received.sender != name:
                failures.append(f"sent a reply for job {received.job!r} as {received.sender!r}")
            elif isinstance(message, ErrorReply):
                failures.append(f"refused it: {message.reason}")
            elif not isinstance(message, StageRes) or message.round != sequence or message.stage != stage:
                failures.append(f"answered something else ({type(message).__name__})")
            else:
                answers.append(_in_memory(message.payload))

        self.transport.exchange([party], lambda _: request, on_reply, lambda _, reason: failures.append(reason))
        if failures or not answers:
            raise VerticalError(f"{party} failed at step {stage}: {failures[0] if failures else 'no reply'}")
        return answers[0]

    def stop(self, parties: Sequence[str]) -> None:
        """Tell the parties the run is over (best effort: one that is gone is skipped)."""
        self._sequence += 1
        request = to_parts(Shutdown(self._sequence), job=self.job, sender=GUEST)
        present = set(self.transport.available())
        self.transport.exchange([p for p in parties if p in present], lambda _: request, lambda *_: None,
                                lambda name, reason: log.info("%s not told to stop: %s", name, reason))


class _Remote:
    """A role of another party, reached through :class:`Peers`."""

    def __init__(self, peers: Peers, name: str) -> None:
        self.peers = peers
        self.name = name

    def _call(self, stage: str, payload: Payload) -> Payload:
        return self.peers.call(self.name, stage, payload)


class RemoteLRHost(_Remote):
    """:class:`hetero_lr.HostRole` of a host elsewhere."""

    def setup(self, setup: Payload) -> None:
        self._call("hetero_lr.setup", setup)

    def forward(self, batch: Payload) -> Payload:
        return self._call("hetero_lr.forward", batch)

    def masked_gradient(self, residual: Payload) -> Payload:
        return self._call("hetero_lr.masked_gradient", residual)

    def update(self, decrypted: Payload) -> None:
        self._call("hetero_lr.update", decrypted)


class RemoteArbiter(_Remote):
    """:class:`hetero_lr.ArbiterRole` of an arbiter elsewhere."""

    def decrypt(self, masked: Payload) -> Payload:
        return self._call("hetero_lr.decrypt", masked)


class RemoteBoostHost(_Remote):
    """:class:`secureboost.HostRole` of a host elsewhere."""

    def setup(self, payload: Payload) -> None:
        self._call("secureboost.setup", payload)

    def receive_gradients(self, payload: Payload) -> None:
        self._call("secureboost.gradients", payload)

    def histograms(self, payload: Payload) -> Payload:
        return self._call("secureboost.histograms", payload)

    def split(self, payload: Payload) -> Payload:
        return self._call("secureboost.split", payload)


def psi_with(peers: Peers, party: str, ids: Sequence[str], *, workers: int | None = None) -> list[str]:
    """Run PSI with ``party`` (a :class:`Party` holding its own IDs): the common IDs, in the order
    both sides now hold."""
    psi = PsiParty(ids, workers=workers)
    theirs = peers.call(party, "psi.blinded", psi.blinded())
    reply = psi.double_blind(theirs)
    return psi.intersection(peers.call(party, "psi.double", reply), reply)


@dataclass
class VerticalResult:
    """What the guest reports: sizes, scores of both splits, timings and traffic."""

    algorithm: str
    rows: dict[str, int]
    metrics: dict[str, dict[str, float]]
    seconds: dict[str, float]
    bytes_sent: int
    bytes_received: int
    losses: list[float] | None = None
    parties: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.__dataclass_fields__}


def lead(
    job: VerticalJob,
    data: PartyData,
    peers: Peers,
    out_dir: Path,
    *,
    workers: int | None = None,
    progress: Progress | None = None,
) -> VerticalResult:
    """Run the job as the guest over ``peers``; writes ``model.json`` and ``metrics.json`` to
    ``out_dir``. Tells every party to stop at the end, also when the run fails."""
    out_dir = prepare_out_dir(out_dir)
    report = progress or (lambda *_: None)
    hosts = [host.name for host in job.hosts]
    seconds: dict[str, float] = {}
    try:
        started = time.perf_counter()
        shared = _common_ids(job, data, peers, hosts, workers, report)
        train_ids, test_ids = _split(shared[hosts[0]], hosts, shared, job)
        for host in hosts:
            position = {row_id: i for i, row_id in enumerate(shared[host])}
            rows = {name: np.array([position[i] for i in ids], dtype=np.int64)
                    for name, ids in zip(SPLITS, (train_ids, test_ids))}
            peers.call(host, "align", Payload({"ids": _digest(shared[host])}, rows))
        parts = {"train": align(data, train_ids), "test": align(data, test_ids)}
        seconds["psi"] = time.perf_counter() - started
        log.info("%d common rows: %d to train, %d to test", len(train_ids) + len(test_ids), len(train_ids),
                 len(test_ids))
        started = time.perf_counter()
        run = _HeteroLRRun(job, peers, parts) if job.vertical.algorithm == "hetero_lr" else _BoostRun(job, peers, parts)
        run.train(report)
        seconds["train"] = time.perf_counter() - started
        started = time.perf_counter()
        metrics = {}
        for split in SPLITS:
            if len(parts[split]):
                labels = np.asarray(parts[split].labels)
                metrics[split] = _scores(labels, run.probabilities(split))
            report("score", SPLITS.index(split) + 1, len(SPLITS))
        seconds["score"] = time.perf_counter() - started
        for peer in job.peers:
            peers.call(peer, "finish")
    except BaseException:
        peers.stop(job.peers)
        raise
    peers.stop(job.peers)
    write_private_json(out_dir / "model.json", run.model())
    result = VerticalResult(
        job.vertical.algorithm,
        {"guest": len(data), "common": len(train_ids) + len(test_ids), "train": len(train_ids), "test": len(test_ids)},
        metrics, seconds, peers.bytes_sent, peers.bytes_received, run.losses(), [GUEST, *job.peers],
    )
    (out_dir / "metrics.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    (out_dir / "job.toml").write_text(job.to_toml())
    return result


def _common_ids(job: VerticalJob, data: PartyData, peers: Peers, hosts: list[str], workers: int | None,
                report: Progress) -> dict[str, list[str]]:
    """Per host, the rows both hold, in the order both hold them."""
    shared: dict[str, list[str]] = {}
    for done, host in enumerate(hosts):
        shared[host] = psi_with(peers, host, data.ids, workers=workers) if job.vertical.psi else sorted(data.ids)
        log.info("%s: %d common IDs", host, len(shared[host]))
        report("psi", done + 1, len(hosts))
    return shared


def _split(first: list[str], hosts: list[str], shared: dict[str, list[str]], job: VerticalJob) -> tuple[list[str], list[str]]:
    """The rows common to every party, sorted (PSI's order is random), cut into train and test."""
    others = [set(shared[host]) for host in hosts[1:]]
    common = sorted(row_id for row_id in first if all(row_id in other for other in others))
    test_size = round(job.vertical.test_fraction * len(common))
    if len(common) - test_size < 2:
        raise VerticalError(f"only {len(common)} rows are common to every party: too few to train on "
                            "(do the ID columns hold the same kind of IDs?)")
    chosen = np.random.default_rng(job.vertical.seed).permutation(len(common))
    test = set(chosen[:test_size].tolist())
    return ([row_id for i, row_id in enumerate(common) if i not in test],
            [row_id for i, row_id in enumerate(common) if i in test])


def _scores(labels: np.ndarray, p: np.ndarray) -> dict[str, float]:
    scores = {"rows": float(len(labels)), "accuracy": float(accuracy_score(labels, p >= 0.5)),
              "log_loss": float(log_loss(labels, np.clip(p, 1e-12, 1 - 1e-12), labels=[0, 1]))}
    if len(np.unique(labels)) == 2:
        scores["auc"] = float(roc_auc_score(labels, p))
    return scores


class _HeteroLRRun:
    """HeteroLR from the guest's seat: the arbiter elsewhere, or its key held here."""

    def __init__(self, job: VerticalJob, peers: Peers, parts: dict[str, PartyData]) -> None:
        self.job, self.peers, self.parts = job, peers, parts
        settings = job.hetero_lr
        self.hosts = [host.name for host in job.hosts]
        if job.uses_arbiter:
            self.arbiter: hetero_lr.ArbiterRole = RemoteArbiter(peers, ARBITER)
            key, private = peers.call(ARBITER, "hetero_lr.key"), None
        else:
            local = hetero_lr.Arbiter(settings.key_bits)
            self.arbiter, key, private = local, local.public_key(), local.private_key
        for host in self.hosts:
            peers.call(host, "hetero_lr.key", key)
        self.guest = hetero_lr.Guest(
            parts["train"], key, self.hosts, lr=settings.lr, epochs=settings.epochs, batch_size=settings.batch_size,
            l2=settings.l2, decay=settings.decay, random_state=job.vertical.seed, standardize=settings.standardize,
            private_key=private,
        )

    def train(self, report: Progress) -> None:
        total = self.guest.epochs * self.guest.batches_per_epoch
        per_epoch = self.guest.batches_per_epoch
        hetero_lr.train(self.guest, [RemoteLRHost(self.peers, host) for host in self.hosts], self.arbiter,
                        lambda epoch, index: report("train", epoch * per_epoch + index + 1, total))

    def probabilities(self, split: str) -> np.ndarray:
        shares = [self.peers.call(host, f"hetero_lr.share.{split}") for host in self.hosts]
        return hetero_lr.probabilities(self.guest, self.parts[split], shares, self.arbiter)

    def losses(self) -> list[float] | None:
        return self.guest.losses

    def model(self) -> dict[str, Any]:
        return {"algorithm": "hetero_lr", **self.guest.model()}


class _BoostRun:
    """SecureBoost from the guest's seat (the guest holds the key)."""

    def __init__(self, job: VerticalJob, peers: Peers, parts: dict[str, PartyData]) -> None:
        self.job, self.peers, self.parts = job, peers, parts
        s = job.secureboost
        params = secureboost.BoostParams(s.n_trees, s.max_depth, s.learning_rate, s.n_bins, s.l2,
                                         s.min_child_weight, s.min_samples_leaf)
        self.hosts = [host.name for host in job.hosts]
        train = parts["train"]
        self.guest = secureboost.Guest(train.features, np.asarray(train.labels), len(self.hosts), params,
                                       s.key_bits, job.vertical.seed)

    def train(self, report: Progress) -> None:
        trees = self.guest.params.n_trees
        secureboost.train(self.guest, [RemoteBoostHost(self.peers, host) for host in self.hosts],
                          lambda tree: report("train", tree + 1, trees))

    def probabilities(self, split: str) -> np.ndarray:
        routers = [self._router(host, split) for host in self.hosts]
        return secureboost.sigmoid(secureboost.predict_scores(self.guest, self.parts[split].features, routers))

    def _router(self, host: str, split: str) -> secureboost.Router:
        return lambda request: self.peers.call(host, f"secureboost.route.{split}", request)

    def losses(self) -> list[float] | None:
        return None

    def model(self) -> dict[str, Any]:
        return {"algorithm": "secureboost", **self.guest.model()}


# --- the other parties ----------------------------------------------------------------------


class Party:
    """A host or the arbiter: answers the guest's steps with its role (a :class:`Responder`).

    ``data`` is a host's own rows (None for the arbiter); ``out_dir`` receives the party's part of
    the model when the guest finishes the run. Steps come in protocol order; a step out of order,
    a malformed payload or data that does not fit is refused with an ``ErrorReply``.
    """

    def __init__(self, name: str, data: PartyData | None, *, job: VerticalJob | None = None,
                 out_dir: Path | None = None, workers: int | None = None) -> None:
        if job is None:  # `fedcrypt psi`: intersect IDs, nothing else
            if data is None:
                raise VerticalDataError(f"{name} needs its IDs")
        elif name != ARBITER:
            job.host(name)
            if data is None:
                raise VerticalDataError(f"host {name} needs its data")
            if data.labels is not None:
                raise VerticalDataError(f"{name}'s data carries labels: only the guest may hold them")
        elif not job.uses_arbiter:
            raise VerticalDataError("this job has no separate arbiter")
        if out_dir is not None and job is not None and name != ARBITER:
            prepare_out_dir(out_dir)  # refuse an old model now, not after training
        self.name, self.data, self.job, self.out_dir, self.workers = name, data, job, out_dir, workers
        self.job_name = job.vertical.name if job is not None else PSI_JOB
        self.finished = False
        self.intersection: list[str] | None = None
        self._psi: tuple[PsiParty, Payload] | None = None
        self._parts: dict[str, PartyData] = {}
        self._lr_host: hetero_lr.Host | None = None
        self._arbiter: hetero_lr.Arbiter | None = None
        self._boost_host: secureboost.Host | None = None
        self._steps = self._arbiter_steps() if name == ARBITER else self._host_steps()
        if job is None:
            self._steps = {stage: step for stage, step in self._steps.items() if stage.startswith("psi.")}

    def _arbiter_steps(self) -> dict[str, Callable[[Payload], Payload | None]]:
        return {"hetero_lr.key": self._arbiter_key, "hetero_lr.decrypt": self._decrypt, "finish": self._finish}

    def _host_steps(self) -> dict[str, Callable[[Payload], Payload | None]]:
        steps: dict[str, Callable[[Payload], Payload | None]] = {
            "psi.blinded": self._psi_blinded, "psi.double": self._psi_double, "align": self._align,
            "hetero_lr.key": self._host_key, "secureboost.setup": self._boost_setup, "finish": self._finish,
        }
        for split in SPLITS:
            steps[f"hetero_lr.share.{split}"] = lambda _, split=split: self._lr().predict_share(self._part(split))
            steps[f"secureboost.route.{split}"] = lambda p, split=split: self._boost().route(
                p, self._part(split).features)
        for step in ("setup", "forward", "masked_gradient", "update"):
            steps[f"hetero_lr.{step}"] = lambda p, step=step: getattr(self._lr(), step)(p)
        for step, method in (("gradients", "receive_gradients"), ("histograms", "histograms"), ("split", "split")):
            steps[f"secureboost.{step}"] = lambda p, method=method: getattr(self._boost(), method)(p)
        return steps

    def handle(self, request: Inbound) -> list[memoryview]:
        """Answer one request of the guest; refusals come back as ``ErrorReply``, never as exceptions."""
        try:
            received = from_bytes(request)
        except WireError as exc:
            return self._reply(ErrorReply(0, f"undecodable request: {exc}"))
        message = received.message
        if received.job != self.job_name or received.sender != GUEST:
            return self._reply(ErrorReply(message.round, f"not a request of the guest of job {self.job_name!r}"))
        if isinstance(message, Shutdown):
            self.finished = True
            return self._reply(Shutdown(message.round))
        if not isinstance(message, StageIns) or message.stage not in self._steps:
            what = message.stage if isinstance(message, StageIns) else type(message).__name__
            return self._reply(ErrorReply(message.round, f"{self.name} has no step {what!r}"))
        started = time.perf_counter()
        try:
            answer = self._steps[message.stage](message.payload)
        except _REFUSALS as exc:
            log.warning("%s refused %s: %s", self.name, message.stage, exc)
            return self._reply(ErrorReply(message.round, f"{type(exc).__name__}: {exc}"))
        elapsed = time.perf_counter() - started
        return self._reply(StageRes(message.round, message.stage, answer or Payload(), elapsed))

    def _reply(self, message: Message) -> list[memoryview]:
        return to_parts(message, job=self.job_name, sender=self.name)

    # host steps

    def _psi_blinded(self, guests: Payload) -> Payload:
        assert self.data is not None
        psi = PsiParty(self.data.ids, workers=self.workers)
        self._psi = (psi, _in_memory(guests))  # kept past this request, whose spool file closes
        return psi.blinded()

    def _psi_double(self, own_double: Payload) -> Payload:
        if self._psi is None:
            raise ValueError("psi.double before psi.blinded")
        psi, guests = self._psi
        reply = psi.double_blind(guests)
        self.intersection = psi.intersection(own_double, reply)
        log.info("%s: %d of its %d IDs are common with the guest", self.name, len(self.intersection), len(psi.ids))
        return reply

    def _align(self, payload: Payload) -> None:
        assert self.data is not None
        shared = self.intersection if self.job.vertical.psi else sorted(self.data.ids)
        if shared is None:
            raise ValueError("align before PSI")
        if payload.meta.get("ids") != _digest(shared):
            raise VerticalDataError(f"{self.name}'s ID list is not the guest's: "
                                    + ("PSI did not end the same on both sides" if self.job.vertical.psi else
                                       "with psi = false every file must hold the same IDs; set psi = true"))
        for split in SPLITS:
            rows = payload.arrays.get(split)
            if rows is None or rows.dtype != np.int64 or rows.ndim != 1:
                raise ValueError(f"align needs int64 row numbers {split!r}")
            rows = np.asarray(rows)
            if rows.size and (rows.min() < 0 or rows.max() >= len(shared)):
                raise ValueError(f"{split} row numbers beyond the {len(shared)} common rows")
            self._parts[split] = align(self.data, [shared[i] for i in rows.tolist()])

    def _part(self, split: str) -> PartyData:
        if split not in self._parts:
            raise ValueError(f"{split} rows asked for before align")
        return self._parts[split]

    def _host_key(self, key: Payload) -> None:
        settings = self.job.hetero_lr
        self._lr_host = hetero_lr.Host(self._part("train"), key, self.name, standardize=settings.standardize)

    def _lr(self) -> hetero_lr.Host:
        if self._lr_host is None:
            raise ValueError("HeteroLR step before the key")
        return self._lr_host

    def _boost_setup(self, payload: Payload) -> None:
        self._boost_host = secureboost.Host(self._part("train").features, self.job.secureboost.n_bins,
                                            self.job.vertical.seed)
        self._boost_host.setup(payload)

    def _boost(self) -> secureboost.Host:
        if self._boost_host is None:
            raise ValueError("SecureBoost step before setup")
        return self._boost_host

    # arbiter steps

    def _arbiter_key(self, _: Payload) -> Payload:
        self._arbiter = hetero_lr.Arbiter(self.job.hetero_lr.key_bits)
        return self._arbiter.public_key()

    def _decrypt(self, masked: Payload) -> Payload:
        if self._arbiter is None:
            raise ValueError("decrypt before the key")
        return self._arbiter.decrypt(masked)

    def _finish(self, _: Payload) -> None:
        """The guest finished: write this party's part of the model (the arbiter has none)."""
        role = self._lr_host or self._boost_host
        if role is not None and self.out_dir is not None:
            out = prepare_out_dir(self.out_dir)
            write_private_json(out / "model.json", {"algorithm": self.job.vertical.algorithm, **role.model()})
            log.info("%s wrote its part of the model to %s", self.name, out / "model.json")



# --- files ---------------------------------------------------------------------------------


def load_guest_data(job: VerticalJob, path: Path | None = None) -> PartyData:
    """The guest's rows (``path`` overrides the job's)."""
    section = job.guest
    return _load(path or job.data_path(section.data), section.id_column, section.label_column)


def load_host_data(job: VerticalJob, name: str, path: Path | None = None) -> PartyData:
    """Host ``name``'s rows (``path`` overrides the job's)."""
    section = job.host(name)
    return _load(path or job.data_path(section.data), section.id_column, None)


def _load(path: Path, id_column: str, label_column: str | None) -> PartyData:
    try:
        return load_party_csv(path, id_column, label_column)
    except OSError as exc:
        raise VerticalDataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise VerticalDataError(f"{path}: not a UTF-8 text CSV") from None


def prepare_out_dir(out_dir: Path) -> Path:
    """Create ``out_dir``; refuse one that already holds a model (a finished run is never overwritten)."""
    out_dir = Path(out_dir)
    if (out_dir / "model.json").exists():
        raise VerticalDataError(f"{out_dir} already holds a model; choose another --out or move it away")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def write_private_json(path: Path, document: dict[str, Any]) -> None:
    """A party's part of the model is its secret: written 0600, never over an existing file."""
    write_secret(path, (json.dumps(document, indent=1) + "\n").encode())


def _in_memory(payload: Payload) -> Payload:
    """``payload`` with its arrays read into memory (a large message arrives in a temporary file
    that the transport closes once it is handled)."""
    return Payload(payload.meta, {key: np.array(value) for key, value in payload.arrays.items()})


def _digest(ids: Sequence[str]) -> str:
    hasher = hashlib.sha256()
    for row_id in ids:
        hasher.update(row_id.encode() + b"\0")
    return hasher.hexdigest()
