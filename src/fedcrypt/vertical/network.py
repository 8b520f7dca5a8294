"""Where a vertical job's parties run: all in this process, one process each, or across machines.

* :func:`run_in_process`: every party in this process, talking through the same message bytes.
* :func:`run_processes`: the guest here, each other party a child process
  (``python -m fedcrypt.vertical.network``) that connects back over gRPC on loopback with mutual
  TLS (a throw-away CA in a private temporary folder, removed at the end).
* :func:`serve_guest` and :func:`join_party`: a deployment. The guest listens (it alone needs a
  reachable address); hosts and the arbiter connect with the certificates of ``fedcrypt certs``
  (the client names are the party names). Each party reads its own data file and refuses a
  guest whose job differs from its own in anything but the data paths.
* :func:`psi_listen` and :func:`psi_connect`: ``fedcrypt psi``, two parties intersecting ID lists.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedcrypt.config.job import JobError
from fedcrypt.config.vertical import ARBITER, GUEST, VerticalJob, load_vertical_job, parse_vertical_job
from fedcrypt.core.messages import JobSpec, from_bytes, to_bytes
from fedcrypt.core.transport import Inbound
from fedcrypt.core.wire import WireError
from fedcrypt.transport.certs import TlsFiles, client_files, server_files, write_bundle
from fedcrypt.transport.grpc_client import ClientLimits, ConnectionRefused, GrpcClientConnection, answer_until_finished
from fedcrypt.transport.grpc_server import GrpcServerTransport, ServerLimits
from fedcrypt.transport.inprocess import InProcessTransport
from fedcrypt.vertical.data import PartyData
from fedcrypt.vertical.federation import (
    PSI_JOB,
    Party,
    Peers,
    Progress,
    VerticalError,
    VerticalResult,
    lead,
    load_guest_data,
    load_host_data,
    psi_with,
)

log = logging.getLogger(__name__)


def run_in_process(job: VerticalJob, out_dir: Path, *, workers: int | None = None,
                   progress: Progress | None = None) -> VerticalResult:
    """Every party in this process; each writes its part of the model to ``out_dir/NAME``."""
    guest_data = load_guest_data(job)
    parties: dict[str, Party] = {
        host.name: Party(host.name, load_host_data(job, host.name), job=job, out_dir=out_dir / host.name,
                         workers=workers)
        for host in job.hosts
    }
    if job.uses_arbiter:
        parties[ARBITER] = Party(ARBITER, None, job=job)
    peers = Peers(InProcessTransport(parties), job.vertical.name)
    return lead(job, guest_data, peers, out_dir / GUEST, workers=workers, progress=progress)


def serve_guest(
    job: VerticalJob,
    data: PartyData,
    *,
    address: str,
    tls: TlsFiles | None,
    out_dir: Path,
    workers: int | None = None,
    progress: Progress | None = None,
    on_listening: Callable[[int], None] | None = None,
) -> VerticalResult:
    """Run the job as the guest of a deployment: listen, wait for every party, lead the run."""
    transport = _listen(job.vertical.name, job.to_toml(), job, address, tls)
    try:
        port = transport.start()
        if on_listening is not None:
            on_listening(port)
        _wait_for(transport, job.peers, job.deploy.wait_timeout, lambda name: (
            f"start it with `fedcrypt vertical JOB.toml --role {name} --connect HOST:{port}`"))
        return lead(job, data, Peers(transport, job.vertical.name), out_dir, workers=workers, progress=progress)
    finally:
        transport.close()


def join_party(
    job: VerticalJob,
    name: str,
    *,
    address: str,
    tls: TlsFiles | None,
    out_dir: Path | None,
    data: PartyData | None = None,
    workers: int | None = None,
    limits: ClientLimits | None = None,
) -> Party:
    """Take part in the guest's run as host ``name`` or the arbiter, until the guest ends it."""
    if name == GUEST:
        raise VerticalError("the guest listens (--listen); hosts and the arbiter connect")
    if name != ARBITER and data is None:
        data = load_host_data(job, name)
    party = Party(name, data, job=job, out_dir=out_dir, workers=workers)
    connection = GrpcClientConnection(address, name, tls=tls, limits=limits or _client_limits(job))
    try:
        _check_same_job(job, connection.hello())
        connection.job = job.vertical.name
        log.info("joined %s as %s", job.vertical.name, name)
        answer_until_finished(connection, party)
        return party
    except ConnectionRefused as exc:
        raise VerticalError(str(exc)) from None
    finally:
        connection.close()


def run_processes(job_path: Path, out_dir: Path, *, workers: int | None = None,
                  progress: Progress | None = None) -> VerticalResult:
    """The guest here, every other party a child process connecting over loopback gRPC with TLS."""
    job = load_vertical_job(job_path)
    guest_data = load_guest_data(job)
    certs = Path(tempfile.mkdtemp(prefix="fedcrypt-vertical-"))  # 0700: only we read the keys
    children: dict[str, subprocess.Popen[bytes]] = {}
    try:
        write_bundle(certs, job.peers, hosts=["127.0.0.1"], days=1)
        transport = _listen(job.vertical.name, job.to_toml(), job, "127.0.0.1:0", server_files(certs))
        try:
            port = transport.start()
            for name in job.peers:
                command = [sys.executable, "-m", "fedcrypt.vertical.network", str(job_path), "--role", name,
                           "--connect", f"127.0.0.1:{port}", "--certs", str(certs), "--out", str(out_dir / name)]
                if workers is not None:
                    command += ["--workers", str(workers)]
                children[name] = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)

            def missing(name: str) -> str:
                child = children[name]
                if child.poll() is None:
                    return "its process is running but did not connect"
                return f"its process ended: {_last_line(child)}"

            _wait_for(transport, job.peers, job.deploy.wait_timeout, missing, children)
            peers = Peers(transport, job.vertical.name)
            result = lead(job, guest_data, peers, out_dir / GUEST, workers=workers, progress=progress)
        finally:
            transport.close()
        for name, child in children.items():
            if child.wait(timeout=job.deploy.liveness_timeout) != 0:
                raise VerticalError(f"{name}'s process ended with status {child.returncode}: {_last_line(child)}")
        return result
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
        shutil.rmtree(certs, ignore_errors=True)


def psi_listen(ids: Sequence[str], *, address: str, tls: TlsFiles | None, peer: str, wait_timeout: float = 300.0,
               workers: int | None = None, on_listening: Callable[[int], None] | None = None) -> list[str]:
    """Intersect ``ids`` with those of ``peer``, which connects with :func:`psi_connect`; returns
    the common IDs in the order both sides get."""
    transport = GrpcServerTransport(job=PSI_JOB, address=address, tls=tls, limits=ServerLimits(round_timeout=3600),
                                    welcome=to_bytes(JobSpec(""), job=PSI_JOB, sender=GUEST))
    try:
        port = transport.start()
        if on_listening is not None:
            on_listening(port)
        _wait_for(transport, [peer], wait_timeout, lambda _: f"run `fedcrypt psi --connect HOST:{port}` there")
        peers = Peers(transport, PSI_JOB)
        try:
            return psi_with(peers, peer, ids, workers=workers)
        finally:
            peers.stop([peer])
    finally:
        transport.close()


def psi_connect(ids: Sequence[str], *, address: str, name: str, tls: TlsFiles | None,
                workers: int | None = None) -> list[str]:
    """The other side of :func:`psi_listen`: connect as ``name`` and return the common IDs."""
    party = Party(name, PartyData(tuple(ids), np.zeros((len(ids), 0)), ()), workers=workers)
    connection = GrpcClientConnection(address, name, tls=tls)
    try:
        welcome = from_bytes(connection.hello())
        if welcome.job != PSI_JOB:
            raise VerticalError(f"the server at {address} runs job {welcome.job!r}, not a PSI")
        connection.job = PSI_JOB
        answer_until_finished(connection, party)
    except (ConnectionRefused, WireError) as exc:
        raise VerticalError(str(exc)) from None
    finally:
        connection.close()
    if party.intersection is None:
        raise VerticalError("the peer ended the PSI before it was complete")
    return party.intersection


def _listen(name: str, toml: str, job: VerticalJob, address: str, tls: TlsFiles | None) -> GrpcServerTransport:
    deploy = job.deploy
    return GrpcServerTransport(
        job=name, address=address, tls=tls, welcome=to_bytes(JobSpec(toml), job=name, sender=GUEST),
        limits=ServerLimits(round_timeout=deploy.step_timeout, liveness_timeout=deploy.liveness_timeout,
                            max_message_bytes=deploy.max_message_mb << 20),
    )


def _client_limits(job: VerticalJob) -> ClientLimits:
    return ClientLimits(max_message_bytes=job.deploy.max_message_mb << 20)


def _wait_for(transport: GrpcServerTransport, names: Sequence[str], timeout: float, hint: Callable[[str], str],
              children: dict[str, subprocess.Popen[bytes]] | None = None) -> None:
    """Block until every named party is connected; :class:`VerticalError` naming those that are not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        missing = [name for name in names if name not in transport.available()]
        if not missing:
            return
        if children and any(children[name].poll() is not None for name in missing):
            break
        time.sleep(0.05)
    missing = [name for name in names if name not in transport.available()]
    raise VerticalError("; ".join(f"{name} did not connect within {timeout:g} s: {hint(name)}" for name in missing))


def _check_same_job(job: VerticalJob, welcome: Inbound) -> None:
    """Refuse a guest whose job differs from ours in anything but data paths."""
    try:
        message = from_bytes(welcome).message
        if not isinstance(message, JobSpec):
            raise WireError(f"expected a job description, got {type(message).__name__}")
        theirs = parse_vertical_job(tomllib.loads(message.toml), source="the guest's job")
    except (WireError, tomllib.TOMLDecodeError, JobError) as exc:
        raise VerticalError(f"the guest's job description is unusable: {exc}") from None
    difference = _first_difference(job.agreement(), theirs.agreement())
    if difference:
        raise VerticalError(f"the guest's job differs from ours at {difference}; use the same job file")


def _first_difference(ours: Any, theirs: Any, where: str = "") -> str:
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in sorted(set(ours) | set(theirs)):
            found = _first_difference(ours.get(key), theirs.get(key), f"{where}.{key}" if where else key)
            if found:
                return found
        return ""
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return next((f for i, (a, b) in enumerate(zip(ours, theirs)) if (f := _first_difference(a, b, f"{where}[{i}]"))), "")
    return "" if ours == theirs else f"{where} (ours {ours!r}, the guest's {theirs!r})"


def _last_line(child: subprocess.Popen[bytes]) -> str:
    """The last line a finished child wrote to stderr (its error message)."""
    assert child.stderr is not None
    lines = child.stderr.read().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"status {child.returncode}"


def main(argv: list[str] | None = None) -> int:
    """A party child process of :func:`run_processes` (logs and errors to stderr)."""
    parser = argparse.ArgumentParser(prog="python -m fedcrypt.vertical.network", description=__doc__)
    parser.add_argument("job", type=Path)
    parser.add_argument("--role", required=True)
    parser.add_argument("--connect", required=True)
    parser.add_argument("--certs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workers", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"{args.role}: %(levelname)s %(message)s")
    try:
        job = load_vertical_job(args.job)
        join_party(job, args.role, address=args.connect, tls=client_files(args.certs, args.role),
                   out_dir=args.out, workers=args.workers)
    except (VerticalError, JobError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
