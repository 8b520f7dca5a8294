"""One whole SecAgg+ round end to end, Flower 1.41 against fedcrypt, in the same run.

Setting (CLI flags): ``--clients`` clients (default 20), each holding its own fixed float32 vector of
``--values`` values (default 100,000; drawn from N(0, 1), no training), ``--dropout`` of them
(default 10 %) dropping after they shared their keys and before sending their masked vector. Both
sides use the same vectors, the same dropped clients, and the same neighbour graph size and
threshold (fedcrypt's defaults for ``--clients``: ``k`` neighbours, ``t`` shares; Flower gets
``num_shares = k + 1``, as its count includes the client's own share, and
``reconstruction_threshold = t``).

Flower side: the real server workflow ``flwr.server.workflow.SecAggPlusWorkflow`` (all four stages:
setup, share keys, collect masked vectors, unmask, then ``FedAvg.aggregate_fit``) called on a
``LegacyContext`` with Flower's ``SimpleClientManager`` and ``GridClientProxy`` objects, driving one
real ``ClientApp`` per node with ``mods=[secaggplus_mod]`` around a ``NumPyClient`` whose ``fit``
returns the node's vector with weight 1 (``max_weight=1``, so Flower's weighted average is the plain
mean of the survivors). Ray is not used: Flower's transport (SuperLink, SuperNode, gRPC/HTTP) is
replaced by ``LoopbackGrid``, an implementation of Flower's ``Grid`` interface that encodes every
message to Flower 1.41's wire form (each nested object ``deflate``d under its content-addressed
object ID, as ``HttpGrid`` and the SuperNode push them), decodes it with
``inflate_object_from_contents`` and calls the destination node's ``ClientApp`` with it, then does
the same for the reply. Flower's real deployment passes each message through more hops (ServerApp
-> SuperLink -> SuperNode -> ClientApp process) than the one encode/decode per direction counted here.
A dropped client raises in ``fit`` when the masked-vector request reaches it, so it sends no reply;
``send_and_receive`` returns the replies of the others at once (no timeout is waited for) and
Flower's workflow takes the dropout-recovery path (it rebuilds the dropped clients' secret keys and
removes their pairwise masks). Initial global parameters are empty, so no model is sent down.

fedcrypt side: ``SecAggMechanism``'s four stages (advertise, share, mask, unmask) driven as in
``bench_secagg.py``: every request and reply goes through ``from_bytes(to_bytes(...))``, dropped
clients are skipped at the mask stage, then ``recover`` decodes the sum.

Both sides run in this one process, all clients one after another. For each side: round = wall
time of the whole round; client = summed time inside the clients (Flower: the ``ClientApp`` call,
mods included; fedcrypt: ``respond``); wire = summed encode + decode time of every message;
server = round - client - wire (Flower: its workflow, strategy and client manager; fedcrypt: the
aggregator's ``request``, ``fold``, ``close_stage``, ``finish`` and ``recover``). Each side runs
``--repeats`` times, interleaved; medians are reported. Checks, every repeat: fedcrypt's sum equals
the exact fixed-point (2^-24) sum of the survivors' vectors; Flower's mean times the number of
survivors is within ``survivors * 2 * clipping_range / quantization_range`` (its stochastic
quantization step per client) of the float64 sum of the survivors' vectors.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import numpy as np
from bench_secagg import _through_wire
from common import RESULTS_DIR, command_line, machine_info, write_json
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import NDArrays, Scalar
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp.grid import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, no_object_id_recompute
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedcrypt.core.mechanism import RoundContext
from fedcrypt.core.messages import StageIns, StageRes
from fedcrypt.crypto.ring import FRAC_BITS
from fedcrypt.mechanisms import SecAggMechanism
from fedcrypt.mechanisms.secagg import MASK, STAGES

RUN_ID = 1
CLIPPING_RANGE = 8.0  # SecAggPlusWorkflow's defaults
QUANTIZATION_RANGE = 4194304


# --- Flower -----------------------------------------------------------------------------------


class Dropped(Exception):
    """Raised by a client that drops out before sending its masked vector."""


class FixedClient(NumPyClient):
    """Returns its fixed vector with weight 1 from ``fit``, or drops out there."""

    def __init__(self, vector: np.ndarray, drops: bool) -> None:
        self.vector = vector
        self.drops = drops

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        if self.drops:
            raise Dropped
        return [self.vector], 1, {}


def _flower_wire(message: Message) -> tuple[Message, int]:
    """``message`` encoded to Flower 1.41's wire form and decoded back, and its size in bytes."""
    with no_object_id_recompute():
        message_id = message.object_id
        contents = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(message).items()}
    size = sum(len(content) for content in contents.values())
    received = cast(Message, inflate_object_from_contents(message_id, contents))
    received.metadata.__dict__["_message_id"] = message_id
    return received, size


class LoopbackGrid(Grid):
    """Flower's ``Grid`` delivering every message, through its wire form, to the destination
    node's ``ClientApp`` in this process, and its reply back the same way."""

    def __init__(self, nodes: dict[int, tuple[ClientApp, Context]]) -> None:
        self._nodes = nodes
        self._run = Run.create_empty(RUN_ID)
        self._replies: dict[str, Message] = {}
        self.client_seconds = dict.fromkeys(nodes, 0.0)
        self.wire_seconds = 0.0
        self.bytes_down = dict.fromkeys(nodes, 0)
        self.bytes_up = dict.fromkeys(nodes, 0)
        self.dropped: set[int] = set()

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message and run its node's ``ClientApp``; keep the reply, if any."""
        message_ids = []
        for message in messages:
            node = message.metadata.dst_node_id
            started = time.perf_counter()
            request, size = _flower_wire(message)
            self.wire_seconds += time.perf_counter() - started
            self.bytes_down[node] += size
            app, context = self._nodes[node]
            started = time.perf_counter()
            try:
                reply = app(request, context)
            except Dropped:
                self.dropped.add(node)
                continue
            finally:
                self.client_seconds[node] += time.perf_counter() - started
            started = time.perf_counter()
            self._replies[request.metadata.message_id], size = _flower_wire(reply)
            self.wire_seconds += time.perf_counter() - started
            self.bytes_up[node] += size
            message_ids.append(request.metadata.message_id)
        return message_ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(message_id) for message_id in message_ids if message_id in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def _node_context(node_id: int) -> Context:
    return Context(run_id=RUN_ID, node_id=node_id, node_config={}, state=RecordDict(), run_config={})


def _client_fn(client: FixedClient) -> Callable[[Context], Client]:
    """A ``client_fn`` (Flower wants exactly ``(context)``) that returns ``client``."""
    return lambda context: client.to_client()


def run_flower(vectors: list[np.ndarray], dropped: set[int], degree: int, threshold: int) -> dict[str, Any]:
    """One round of Flower's ``SecAggPlusWorkflow`` over ``LoopbackGrid``, timed and checked."""
    clients = len(vectors)
    node_ids = list(range(1, clients + 1))  # node i + 1 holds vectors[i]
    nodes = {}
    for index, node_id in enumerate(node_ids):
        app = ClientApp(client_fn=_client_fn(FixedClient(vectors[index], index in dropped)), mods=[secaggplus_mod])
        nodes[node_id] = (app, _node_context(node_id))
    grid = LoopbackGrid(nodes)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SUPERLINK_NODE_ID  # as start_grid
    manager = SimpleClientManager()
    for node_id in node_ids:
        manager.register(GridClientProxy(node_id, grid, RUN_ID))
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=clients, min_available_clients=clients)
    context = LegacyContext(_node_context(0), strategy=strategy, client_manager=manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(
        num_shares=degree + 1,
        reconstruction_threshold=threshold,
        max_weight=1.0,
        clipping_range=CLIPPING_RANGE,
        quantization_range=QUANTIZATION_RANGE,
    )
    started = time.perf_counter()
    workflow(grid, context)
    total = time.perf_counter() - started
    mean = context.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()[0].astype(np.float64)
    survivors = [i for i in range(clients) if i not in dropped]
    plain = np.sum([vectors[i].astype(np.float64) for i in survivors], axis=0)
    error = float(np.abs(mean * len(survivors) - plain).max())
    bound = len(survivors) * 2 * CLIPPING_RANGE / QUANTIZATION_RANGE
    finished = [node_ids[i] for i in survivors]
    client = sum(grid.client_seconds.values())
    return {
        "round_seconds": total,
        "client_seconds": client,
        "client_seconds_mean": float(np.mean([grid.client_seconds[n] for n in finished])),
        "wire_seconds": grid.wire_seconds,
        "server_seconds": total - client - grid.wire_seconds,
        "bytes_up_per_client": float(np.mean([grid.bytes_up[n] for n in finished])),
        "bytes_down_per_client": float(np.mean([grid.bytes_down[n] for n in finished])),
        "dropped": len(grid.dropped),
        "max_abs_error": error,
        "error_bound": bound,
        "sum_ok": bool(grid.dropped == {node_ids[i] for i in dropped} and error <= bound),
    }


# --- fedcrypt ---------------------------------------------------------------------------------


def run_fedcrypt(vectors: list[np.ndarray], dropped: set[int], neighbors: int | None) -> dict[str, Any]:
    """One round of fedcrypt's ``secagg`` through the real wire encoding, timed and checked."""
    mechanism = SecAggMechanism(neighbors=neighbors)
    names = [f"client-{i:03d}" for i in range(len(vectors))]
    gone = {names[i] for i in dropped}
    ctx = RoundContext("bench", 1, tuple(names), vectors[0].size)
    client_seconds = dict.fromkeys(names, 0.0)
    wire = 0.0
    up = dict.fromkeys(names, 0)
    down = dict.fromkeys(names, 0)
    started_round = time.perf_counter()
    aggregator = mechanism.server_round(ctx)
    protectors = {name: mechanism.client_round(ctx, name) for name in names}
    alive = names
    for stage in STAGES:
        survivors = []
        for index, name in enumerate(names):
            if name not in alive or (stage == MASK and name in gone):
                continue
            instruction = StageIns(1, stage, aggregator.request(stage, name))
            started = time.perf_counter()
            request, size = _through_wire(instruction)
            wire += time.perf_counter() - started
            down[name] += size
            started = time.perf_counter()
            reply = protectors[name].respond(stage, request, vectors[index])
            client_seconds[name] += time.perf_counter() - started
            started = time.perf_counter()
            payload, size = _through_wire(StageRes(1, stage, reply))
            wire += time.perf_counter() - started
            up[name] += size
            aggregator.fold(stage, name, payload)
            survivors.append(name)
        aggregator.close_stage(stage, survivors)
        alive = survivors
    total = mechanism.recover(aggregator.finish(), ctx)
    round_seconds = time.perf_counter() - started_round
    finished = [name for name in names if name not in gone]
    kept = [vectors[i].astype(np.float64) for i in range(len(names)) if i not in dropped]
    exact = np.sum([np.rint(vector * 2.0**FRAC_BITS).astype(np.int64) for vector in kept], axis=0)
    client = sum(client_seconds.values())
    return {
        "round_seconds": round_seconds,
        "client_seconds": client,
        "client_seconds_mean": float(np.mean([client_seconds[n] for n in finished])),
        "wire_seconds": wire,
        "server_seconds": round_seconds - client - wire,
        "bytes_up_per_client": float(np.mean([up[n] for n in finished])),
        "bytes_down_per_client": float(np.mean([down[n] for n in finished])),
        "dropped": len(gone),
        "neighbors": aggregator.metrics()["secagg_neighbors"],
        "threshold": aggregator.metrics()["secagg_threshold"],
        "sum_ok": bool(np.array_equal(total, (exact / 2.0**FRAC_BITS).astype(np.float32))),
    }


# --- report -----------------------------------------------------------------------------------

FIGURES = ("round_seconds", "server_seconds", "client_seconds", "client_seconds_mean", "wire_seconds")


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the timed figures over ``runs``; the other figures of the first run; checks of all."""
    summary = dict(runs[0])
    summary.update({figure: statistics.median(run[figure] for run in runs) for figure in FIGURES})
    summary["sum_ok"] = all(run["sum_ok"] for run in runs)
    if "max_abs_error" in summary:
        summary["max_abs_error"] = max(run["max_abs_error"] for run in runs)
    return summary


def table(flower: dict[str, Any], fedcrypt: dict[str, Any]) -> str:
    """The two sides and their ratios as a markdown table."""
    def row(name: str, r: dict[str, Any], check: str) -> str:
        return (
            f"| {name} | {r['round_seconds']:.3f} | {r['server_seconds']:.3f} | {r['client_seconds']:.3f} | "
            f"{r['client_seconds_mean']:.4f} | {r['wire_seconds']:.3f} | {r['bytes_up_per_client'] / 1e6:.3f} | "
            f"{r['bytes_down_per_client'] / 1e6:.4f} | {check} |"
        )

    ratio = {figure: flower[figure] / fedcrypt[figure] for figure in FIGURES}
    return "\n".join([
        "| side | round s | server s | clients s (sum) | client s (mean) | wire s | MB up / client "
        "| MB down / client | sum check |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        row("Flower 1.41 SecAgg+", flower,
            f"{flower['sum_ok']} (max error {flower['max_abs_error']:.2e} <= {flower['error_bound']:.2e})"),
        row("fedcrypt `secagg`", fedcrypt, f"{fedcrypt['sum_ok']} (exact)"),
        f"| **Flower ÷ fedcrypt** | **{ratio['round_seconds']:.1f}x** | {ratio['server_seconds']:.1f}x | "
        f"{ratio['client_seconds']:.1f}x | {ratio['client_seconds_mean']:.1f}x | {ratio['wire_seconds']:.1f}x | "
        f"{flower['bytes_up_per_client'] / fedcrypt['bytes_up_per_client']:.2f}x | "
        f"{flower['bytes_down_per_client'] / fedcrypt['bytes_down_per_client']:.2f}x | |",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--values", type=int, default=100_000)
    parser.add_argument("--dropout", type=float, default=0.1, help="fraction dropping after sharing their keys")
    parser.add_argument("--neighbors", type=int, default=None, help="k (default: fedcrypt's ~3 log2 n)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "secagg_e2e.json")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    rng = np.random.default_rng(0)
    vectors = [rng.normal(0, 1, args.values).astype(np.float32) for _ in range(args.clients)]
    count = round(args.dropout * args.clients)
    dropped = set(range(0, args.clients, max(1, round(1 / args.dropout)))[:count]) if count else set()
    mechanism = SecAggMechanism(neighbors=args.neighbors)
    degree = mechanism.degree(args.clients)
    threshold = mechanism.shares_needed(degree)
    flower_runs, fedcrypt_runs = [], []
    for _ in range(args.repeats):
        flower_runs.append(run_flower(vectors, dropped, degree, threshold))
        fedcrypt_runs.append(run_fedcrypt(vectors, dropped, args.neighbors))
    flower, fedcrypt = _median(flower_runs), _median(fedcrypt_runs)
    result = {
        "clients": args.clients,
        "values": args.values,
        "dropped_after_sharing": len(dropped),
        "neighbors": degree,
        "threshold": threshold,
        "flower_num_shares": degree + 1,
        "repeats": args.repeats,
        "flower": flower,
        "fedcrypt": fedcrypt,
        "flower_runs": flower_runs,
        "fedcrypt_runs": fedcrypt_runs,
        "ratio_round": flower["round_seconds"] / fedcrypt["round_seconds"],
        "ratio_server": flower["server_seconds"] / fedcrypt["server_seconds"],
        "ratio_client": flower["client_seconds"] / fedcrypt["client_seconds"],
    }
    write_json(args.out, {"benchmark": "secagg_e2e", "command": command_line(),
                          "machine": machine_info(("fedcrypt", "cryptography", "numpy", "flwr")), "result": result})
    print(f"{args.clients} clients, {args.values:,} values, {len(dropped)} dropped after sharing, "
          f"k = {degree} neighbours, t = {threshold}; medians of {args.repeats} interleaved runs\n")
    print(table(flower, fedcrypt))
    print(f"\nResults: {args.out}")


if __name__ == "__main__":
    main()
