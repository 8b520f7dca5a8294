"""Real deployment on loopback: bytes on the wire, round time, server memory and a > 2 GB transfer.

Part 1 starts ``fedcrypt server`` and ``--clients`` ``fedcrypt client`` processes on 127.0.0.1 with
mutual TLS (digits, MLP 64-H-H-10, IID, every client training each round) and measures

* payload bytes: ``bytes_up + bytes_down`` summed over the rounds of the server's metrics.jsonl;
* wire bytes: the growth of the ``lo`` interface's transmit counter (/proc/net/dev) from just
  before the server starts until every process has exited, minus the background loopback traffic
  (the rate over an idle window measured beforehand, times the run's duration);
* time per round against ``fedcrypt.simulate`` of the same job in this process;
* resident memory (VmRSS, VmHWM of /proc/PID/status every 0.1 s), in units of one float32
  update: the server's at "listening", when round 2 starts (clients connected, one round done:
  gRPC connection buffers and torch's evaluation workspace exist) and at its peak; the first
  client's when it joined, when its round-2 request arrives and at its peak.

Part 2 sends one ``--size``-byte payload each way through ``GrpcServerTransport`` /
``GrpcClientConnection`` (TLS, chunked stream) inside this process and times both directions
(the receiver spools it to a temporary file as it arrives, as deployments do).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import RESULTS_DIR, command_line, figure_table, machine_info, peak_rss_bytes, write_json

from fedcrypt import simulate
from fedcrypt.config.job import load_job
from fedcrypt.core.params import ParamSpec
from fedcrypt.core.wire import SpooledMessage
from fedcrypt.data import load_dataset
from fedcrypt.models.zoo import build_model
from fedcrypt.transport.certs import client_files, server_files, write_bundle
from fedcrypt.transport.grpc_client import ClientLimits, GrpcClientConnection
from fedcrypt.transport.grpc_server import GrpcServerTransport, ServerLimits

OVERHEAD_GOAL = 0.01
MEMORY_GOAL_UPDATES = 3.0
GIB = 1024**3
MIB = 1024**2
MB = 1e6
SAMPLE_SECONDS = 0.1
START_TIMEOUT = 120.0
TRANSFER_TIMEOUT = 600.0
JOB = """\
[job]
name = "bench-deploy"
rounds = {rounds}
seed = 0
[data]
dataset = "digits"
num_clients = {clients}
partition = "iid"
[model]
name = "mlp"
hidden = [{hidden}, {hidden}]
[train]
local_epochs = 1
batch_size = 32
lr = 0.01
[strategy]
min_fit_clients = {clients}
[deploy]
min_clients = {clients}
wait_timeout = 300
round_timeout = 300
liveness_timeout = 60
"""


# --- measurements from /proc --------------------------------------------------------------


def loopback_tx_bytes() -> int:
    """Bytes transmitted so far on ``lo`` (on loopback every byte is transmitted exactly once)."""
    with open("/proc/net/dev", encoding="ascii") as dev:
        for line in dev:
            name, _, counters = line.partition(":")
            if name.strip() == "lo":
                return int(counters.split()[8])
    raise RuntimeError("no lo interface in /proc/net/dev")


def memory_of(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of a process in bytes; None once it has exited."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) * 1024
    except OSError:
        return None
    if len(values) < 2:  # a zombie has no memory lines
        return None
    return values["VmRSS"], values["VmHWM"]


@dataclass
class MemorySampler:
    """Samples a process's VmRSS / VmHWM every 0.1 s in a thread until it exits.

    ``timeline`` holds [seconds since the first sample, VmRSS in MiB] for every sample.
    """

    pid: int
    peak_hwm: int = 0
    peak_rss: int = 0
    timeline: list[tuple[float, int]] = field(default_factory=list)
    _thread: threading.Thread = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        while (memory := memory_of(self.pid)) is not None:
            self.peak_rss = max(self.peak_rss, memory[0])
            self.peak_hwm = max(self.peak_hwm, memory[1])
            self.timeline.append((round(time.monotonic() - started, 2), memory[0] // MIB))
            time.sleep(SAMPLE_SECONDS)

    def join(self) -> None:
        self._thread.join(5.0)


# --- part 1: server and client processes ---------------------------------------------------


def parameter_count(hidden: int) -> int:
    """Parameters of the digits MLP 64-``hidden``-``hidden``-10."""
    dataset = load_dataset("digits")
    model = build_model("mlp", dataset.input_shape, dataset.num_classes, hidden=(hidden, hidden))
    return ParamSpec.from_state_dict(model.state_dict()).size


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``python -m fedcrypt.cli ARGS`` with one torch thread, output to ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "fedcrypt.cli", *args], stdout=handle, stderr=subprocess.STDOUT, env=env
        )


def wait_for_port(server: subprocess.Popen[bytes], log: Path) -> int:
    """The port from the server's "listening on port N" line."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if "listening on port" in line:
                return int(line.split("listening on port", 1)[1].split(";")[0])
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}:\n{log.read_text()}")
        time.sleep(0.05)
    raise RuntimeError(f"server did not listen within {START_TIMEOUT:g} s:\n{log.read_text()}")


def rss_when_logged(process: subprocess.Popen[bytes], log: Path, text: str, timeout: float = START_TIMEOUT) -> int:
    """The process's VmRSS as soon as ``text`` appears in its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if log.exists() and text in log.read_text(errors="replace"):
            memory = memory_of(process.pid)
            if memory is not None:
                return memory[0]
        time.sleep(0.05)
    raise RuntimeError(f"{log.name} never logged {text!r}:\n{log.read_text(errors='replace')[-2000:]}")


def reset_peak(sampler: MemorySampler) -> None:
    """Restart the peak (VmHWM) of the sampled process from its current RSS."""
    Path(f"/proc/{sampler.pid}/clear_refs").write_text("5")
    sampler.peak_hwm = 0


def finish(process: subprocess.Popen[bytes], log: Path, deadline: float) -> None:
    """Wait for a process until ``deadline`` (monotonic) and insist on exit status 0."""
    code = process.wait(max(deadline - time.monotonic(), 1.0))
    if code != 0:
        raise RuntimeError(f"{' '.join(map(str, process.args))} exited with {code}:\n{log.read_text()[-4000:]}")


def idle_loopback(seconds: float) -> dict[str, float]:
    """Loopback bytes per second while this benchmark does nothing."""
    before, started = loopback_tx_bytes(), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    delta = loopback_tx_bytes() - before
    return {"seconds": elapsed, "bytes": delta, "bytes_per_second": delta / elapsed}


def run_deployment(job_path: Path, work: Path, clients: int, timeout: float, idle_rate: float) -> dict[str, Any]:
    """Server plus clients as processes; returns wire and payload bytes, round times, server memory."""
    certs, out = work / "certs", work / "out"
    names = [f"client-{i:03d}" for i in range(clients)]
    write_bundle(certs, names)
    processes: list[subprocess.Popen[bytes]] = []
    load_before = os.getloadavg()
    try:
        wire_before, started = loopback_tx_bytes(), time.monotonic()
        server_log = work / "server.log"
        server_args = ["server", str(job_path), "--address", "127.0.0.1:0", "--certs", str(certs), "--out", str(out)]
        server = spawn(server_args, server_log)
        processes.append(server)
        sampler = MemorySampler(server.pid)
        port = wait_for_port(server, server_log)
        listening = memory_of(server.pid)
        if listening is None:
            raise RuntimeError(f"server exited after listening:\n{server_log.read_text()}")
        listening_at = time.monotonic() - started
        for index, name in enumerate(names):
            client_args = ["client", "--server", f"localhost:{port}", "--name", name, "--partition", str(index)]
            client_args += ["--certs", str(certs), "--threads", "1"] + (["--verbose"] if index == 0 else [])
            processes.append(spawn(client_args, work / f"{name}.log"))
        client_sampler = MemorySampler(processes[1].pid)
        client_log = work / f"{names[0]}.log"
        client_joined = rss_when_logged(processes[1], client_log, "joined job")
        # Idle again, after a round of training (torch's first step allocates lasting workspace).
        client_warm = rss_when_logged(processes[1], client_log, "request 2 received", timeout)
        reset_peak(client_sampler)
        # The server prints round 1's table row once that round is checkpointed: round 2 starts.
        server_warm = rss_when_logged(server, server_log, "\n    1 ", timeout)
        first_round = memory_of(server.pid)
        server_first_hwm = max(sampler.peak_hwm, first_round[1] if first_round else 0)
        reset_peak(sampler)
        deadline = started + timeout
        finish(server, server_log, deadline)
        for process, name in zip(processes[1:], names):
            finish(process, work / f"{name}.log", deadline + 30)
        duration = time.monotonic() - started
        wire_raw = loopback_tx_bytes() - wire_before
        sampler.join()
        client_sampler.join()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if any(r["status"] != "ok" or r["succeeded"] != clients for r in rounds):
        raise RuntimeError(f"not every client succeeded in every round: {rounds}")
    payload = sum(r["bytes_up"] + r["bytes_down"] for r in rounds)
    background = idle_rate * duration
    wire = wire_raw - background
    return {
        "port": port,
        "duration_seconds": duration,
        "listening_after_seconds": listening_at,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "payload_bytes": payload,
        "wire_bytes_raw": wire_raw,
        "background_bytes_estimate": background,
        "wire_bytes": wire,
        "overhead": wire / payload - 1,
        "server_memory": {
            "rss_at_listening_bytes": listening[0],
            "peak_hwm_bytes": max(server_first_hwm, sampler.peak_hwm, listening[1]),
            "rss_when_round_2_started_bytes": server_warm,
            "peak_hwm_rounds_2_on_bytes": sampler.peak_hwm,
            "peak_rss_sampled_bytes": sampler.peak_rss,
            "samples": len(sampler.timeline),
            "timeline_seconds_rss_mib": sampler.timeline,
        },
        "client_memory": {
            "client": names[0],
            "rss_when_joined_bytes": client_joined,
            "rss_when_request_2_arrived_bytes": client_warm,
            "peak_hwm_rounds_2_on_bytes": client_sampler.peak_hwm,
            "peak_rss_sampled_bytes": client_sampler.peak_rss,
            "timeline_seconds_rss_mib": client_sampler.timeline,
        },
        "rounds": rounds,
    }


def run_simulation(job_path: Path) -> dict[str, Any]:
    """``fedcrypt.simulate`` of the same job in this process (torch's default thread count)."""
    started = time.perf_counter()
    result = simulate(job_path)
    return {
        "seconds": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
        "rounds": [record.to_json() for record in result.history],
    }


def round_times(rounds: list[dict[str, Any]]) -> tuple[float, float | None]:
    """Round 1's seconds and the mean of rounds 2.. (None with one round)."""
    later = [r["seconds"] for r in rounds[1:]]
    return rounds[0]["seconds"], statistics.mean(later) if later else None


# --- part 2: one big payload each way -----------------------------------------------------


def pattern(size: int, offset: int) -> bytes:
    """``size`` bytes where byte i is (i + offset) % 256 (one allocation if 256 divides ``size``)."""
    whole, rest = divmod(size, 256)
    block = bytes((i + offset) % 256 for i in range(256))
    data = block * whole
    return data + block[:rest] if rest else data


def check_pattern(data: bytes | bytearray | SpooledMessage, size: int, offset: int) -> bool:
    """Exact length, and 4097 evenly spread bytes (first and last included) match the pattern."""
    if len(data) != size:
        return False
    positions = np.linspace(0, size - 1, 4097).astype(np.int64)
    if isinstance(data, SpooledMessage):  # a large message arrives in a temporary file
        got = np.array([data.read_at(int(p), 1)[0] for p in positions], dtype=np.uint8)
    else:
        got = np.frombuffer(data, dtype=np.uint8)[positions]
    return bool(np.array_equal(got, ((positions + offset) % 256).astype(np.uint8)))


def big_transfer(size: int, certs: Path) -> dict[str, Any]:
    """Send ``size`` bytes server -> client and ``size`` bytes back through the chunked TLS stream."""
    write_bundle(certs, ["client-000"])
    limit = max(3 << 30, size)
    transport = GrpcServerTransport(
        job="big",
        address="127.0.0.1:0",
        welcome=b"w",
        tls=server_files(certs),
        limits=ServerLimits(
            round_timeout=TRANSFER_TIMEOUT, liveness_timeout=TRANSFER_TIMEOUT, max_message_bytes=limit
        ),
    )
    port = transport.start()
    marks: dict[str, float] = {}
    checks: dict[str, bool] = {}
    errors: list[BaseException] = []

    def client() -> None:
        tls = client_files(certs, "client-000")
        limits = ClientLimits(max_message_bytes=limit)
        connection = GrpcClientConnection(f"localhost:{port}", "client-000", tls=tls, limits=limits)
        try:
            connection.hello()
            connection.job = "big"
            request = None
            while request is None:
                request = connection.next_request()
            marks["down_received"] = time.perf_counter()
            checks["down"] = check_pattern(request, size, 0)
            if isinstance(request, SpooledMessage):
                request.close()
            del request
            reply = pattern(size, 1)
            marks["up_started"] = time.perf_counter()
            connection.reply(reply)
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)
        finally:
            connection.close()

    def on_reply(_: str, data: bytes | SpooledMessage) -> None:
        marks["up_received"] = time.perf_counter()
        checks["up"] = check_pattern(data, size, 1)

    failures: list[str] = []
    load_before = os.getloadavg()
    rss_before = memory_of(os.getpid())
    outgoing = {"data": pattern(size, 0)}  # popped by the transport: freed once it is sent
    thread = threading.Thread(target=client, name="big-client", daemon=True)
    try:
        thread.start()
        transport.wait_for_clients(1, START_TIMEOUT)
        marks["down_started"] = time.perf_counter()
        transport.exchange(
            ["client-000"],
            make_request=lambda _: outgoing.pop("data"),
            on_reply=on_reply,
            on_failure=lambda name, reason: failures.append(f"{name}: {reason}"),
        )
        thread.join(TRANSFER_TIMEOUT)
    finally:
        transport.close()
    if errors:
        raise errors[0]
    if failures or "up_received" not in marks:
        raise RuntimeError(f"big transfer failed: {failures or 'no reply'}")
    down = marks["down_received"] - marks["down_started"]
    up = marks["up_received"] - marks["up_started"]
    return {
        "size_bytes": size,
        "exceeds_2_gib": size > 2 * GIB,
        "server_to_client": {"seconds": down, "mb_per_second": size / MB / down, "exact": checks["down"]},
        "client_to_server": {"seconds": up, "mb_per_second": size / MB / up, "exact": checks["up"]},
        "rss_before_bytes": rss_before[0] if rss_before else None,
        "peak_rss_bytes": peak_rss_bytes(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


# --- report --------------------------------------------------------------------------------


def deployment_table(params: int, deploy: dict[str, Any], sim: dict[str, Any], idle: dict[str, float]) -> str:
    """Part 1's figures as one markdown table."""
    update = 4 * params
    memory = deploy["server_memory"]
    growth = memory["peak_hwm_bytes"] - memory["rss_at_listening_bytes"]
    updates = growth / update
    warm_growth = memory["peak_hwm_rounds_2_on_bytes"] - memory["rss_when_round_2_started_bytes"]
    overhead = deploy["overhead"]
    dep_first, dep_later = round_times(deploy["rounds"])
    sim_first, sim_later = round_times(sim["rounds"])
    rows = [
        ("clients / rounds", f"{deploy['rounds'][0]['sampled']} / {len(deploy['rounds'])}"),
        ("parameters (one float32 update)", f"{params:,} ({update / MB:.1f} MB)"),
        ("payload bytes (metrics.jsonl, up + down)", f"{deploy['payload_bytes'] / MB:,.1f} MB"),
        ("loopback bytes, raw", f"{deploy['wire_bytes_raw'] / MB:,.1f} MB"),
        (
            "background loopback (idle rate x run time)",
            f"{deploy['background_bytes_estimate'] / MB:,.3f} MB "
            f"({idle['bytes_per_second'] / 1e3:.2f} kB/s over {idle['seconds']:.0f} s idle)",
        ),
        ("wire bytes (raw - background)", f"{deploy['wire_bytes'] / MB:,.1f} MB"),
        (
            "overhead (wire / payload - 1)",
            f"{100 * overhead:.3f} % (goal <= {100 * OVERHEAD_GOAL:g} %: "
            f"{'met' if overhead <= OVERHEAD_GOAL else 'NOT met'})",
        ),
        ("round 1: deployment / simulation", f"{dep_first:.2f} s / {sim_first:.2f} s = {dep_first / sim_first:.2f}x"),
    ]
    if dep_later is not None and sim_later is not None:
        rows.append(
            (
                f"rounds 2..{len(deploy['rounds'])} mean: deployment / simulation",
                f"{dep_later:.2f} s / {sim_later:.2f} s = {dep_later / sim_later:.2f}x",
            )
        )
    rows += [
        ("deployment wall time (server start to all exited)", f"{deploy['duration_seconds']:.1f} s"),
        ("simulation wall time", f"{sim['seconds']:.1f} s"),
        ("server RSS at listening (baseline)", f"{memory['rss_at_listening_bytes'] / MIB:,.0f} MiB"),
        ("server peak (VmHWM)", f"{memory['peak_hwm_bytes'] / MIB:,.0f} MiB"),
        ("server peak - baseline", f"{growth / MIB:,.0f} MiB = {updates:.2f} updates"),
        (
            "server RSS when round 2 started (clients connected, one round done) / peak of rounds 2..",
            f"{memory['rss_when_round_2_started_bytes'] / MIB:,.0f} / "
            f"{memory['peak_hwm_rounds_2_on_bytes'] / MIB:,.0f} MiB",
        ),
        (
            "server peak of rounds 2.. - RSS when round 2 started",
            f"{warm_growth / MIB:,.0f} MiB = {warm_growth / update:.2f} updates (goal < {MEMORY_GOAL_UPDATES:g}: "
            f"{'met' if warm_growth / update < MEMORY_GOAL_UPDATES else 'NOT met'})",
        ),
    ]
    client = deploy["client_memory"]
    warm, peak = client["rss_when_request_2_arrived_bytes"], client["peak_hwm_rounds_2_on_bytes"]
    first_growth = client["peak_rss_sampled_bytes"] - client["rss_when_joined_bytes"]
    rows += [
        (
            f"client ({client['client']}) RSS: joined / round 2 request arrived / peak of rounds 2..",
            f"{client['rss_when_joined_bytes'] / MIB:,.0f} / {warm / MIB:,.0f} / {peak / MIB:,.0f} MiB",
        ),
        (
            "client peak - RSS when round 2's request arrived",
            f"{(peak - warm) / MIB:,.0f} MiB = {(peak - warm) / update:.2f} updates",
        ),
        (
            "client peak (sampled) - joined (includes torch's lasting first-step workspace)",
            f"{first_growth / MIB:,.0f} MiB = {first_growth / update:.2f} updates",
        ),
        (
            "load average (1 min) before / after",
            f"{deploy['load_average_before'][0]:.2f} / {deploy['load_average_after'][0]:.2f}",
        ),
    ]
    return figure_table(rows)


def transfer_table(big: dict[str, Any]) -> str:
    """Part 2's figures as one markdown table."""
    size = big["size_bytes"]
    lines = ["| direction | bytes | seconds | MB/s | received exactly |", "|---|---:|---:|---:|---|"]
    for label, key in (("server -> client", "server_to_client"), ("client -> server", "client_to_server")):
        leg = big[key]
        lines.append(
            f"| {label} | {size:,} ({size / GIB:.2f} GiB) | {leg['seconds']:.1f} | "
            f"{leg['mb_per_second']:.0f} | {'yes' if leg['exact'] else 'NO'} |"
        )
    rows = [
        ("payload > 2 GiB (gRPC's per-message cap)", "yes" if big["exceeds_2_gib"] else "NO"),
        (
            "RSS of this process before / peak (ru_maxrss)",
            f"{big['rss_before_bytes'] / MIB:,.0f} / {big['peak_rss_bytes'] / MIB:,.0f} MiB",
        ),
        (
            "load average (1 min) before / after",
            f"{big['load_average_before'][0]:.2f} / {big['load_average_after'][0]:.2f}",
        ),
    ]
    return "\n".join(lines) + "\n\n" + figure_table(rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20, help="client processes (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--hidden", type=int, default=3160, help="width of both hidden layers (default 3160: 10.2M parameters)"
    )
    parser.add_argument(
        "--size",
        type=lambda text: int(float(text)),
        default=2_200_000_000,
        help="bytes sent each way in part 2 (default 2.2e9; more than 2 GiB shows the cap is gone)",
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=20.0, help="idle window for background loopback traffic (default 20)"
    )
    parser.add_argument(
        "--timeout", type=float, default=420.0, help="seconds allowed for part 1's processes (default 420)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "deploy.json", help="JSON results file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    machine = machine_info(("fedcrypt", "torch", "numpy", "grpcio", "protobuf", "cryptography"))
    params = parameter_count(args.hidden)
    print(f"{params:,} parameters; measuring idle loopback traffic for {args.idle_seconds:g} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        work = Path(tmp)
        job_path = work / "job.toml"
        job_path.write_text(JOB.format(rounds=args.rounds, clients=args.clients, hidden=args.hidden))
        idle = idle_loopback(args.idle_seconds)
        print(f"part 1: server and {args.clients} clients over TLS", flush=True)
        deploy = run_deployment(job_path, work, args.clients, args.timeout, idle["bytes_per_second"])
        print("part 1: simulation of the same job", flush=True)
        sim = run_simulation(job_path)
        print(f"part 2: {args.size:,} bytes each way", flush=True)
        big = big_transfer(args.size, work / "big-certs")
        job_toml = load_job(job_path).to_toml()
    payload = {
        "benchmark": "deploy",
        "command": command_line(),
        "machine": machine,
        "parameters": params,
        "update_bytes": 4 * params,
        "goals": {"overhead": OVERHEAD_GOAL, "server_peak_growth_updates": MEMORY_GOAL_UPDATES},
        "job_toml": job_toml,
        "idle_loopback": idle,
        "deployment": deploy,
        "simulation": sim,
        "big_transfer": big,
    }
    write_json(args.out, payload)
    print("\n" + deployment_table(params, deploy, sim, idle))
    print("\n" + transfer_table(big))
    print(f"\nResults: {args.out}")


if __name__ == "__main__":
    main()
