"""``fedcrypt serve`` under load: 2,000 requests on loopback at batch 1 and batch 32.

The server is ``python -m fedcrypt.cli serve RUN_DIR --port 0`` in a process of its own (uvicorn,
one worker). The load generator is bounded: ``--concurrency`` threads in this process, each with
one keep-alive HTTP/1.1 connection, send requests until ``--requests`` have been sent in all; a
request's latency runs from sending it to having parsed the whole JSON answer. Two models: the
quickstart MLP (8x8 digits) and the CNN of McMahan et al. on 28x28 inputs (1.66 M parameters).
Their weights do not change the cost, so each run folder is written directly (``model.pt`` from a
freshly built model and its ``model.json``). The baseline, measured in the same run, is the same
model's forward pass in this process on the same batch: the ratio is what HTTP, JSON and the input
checks add. A sample of answers is checked against the in-process predictions.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import RESULTS_DIR, command_line, figure_table, machine_info, write_json

from fedcrypt.models.zoo import ModelSpec
from fedcrypt.tracking.rundir import RunDirectory

MODELS = {
    "mlp (digits 8x8)": ModelSpec("mlp", (1, 8, 8), 10, tuple("0123456789"), (64, 64), "digits"),
    "cnn (28x28)": ModelSpec("cnn", (1, 28, 28), 10, tuple("0123456789"), (64, 64), "mnist"),
}


def write_run(spec: ModelSpec, folder: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = spec.build().eval()
    RunDirectory(folder).write_model(model.state_dict(), spec)
    return model


def start_server(folder: Path) -> tuple[subprocess.Popen[str], str, int]:
    server = subprocess.Popen([sys.executable, "-m", "fedcrypt.cli", "serve", str(folder), "--port", "0"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "300"})
    line = server.stdout.readline()  # type: ignore[union-attr]
    found = re.search(r"http://(127\.0\.0\.1):(\d+)", line)
    if not found:
        server.kill()
        raise RuntimeError(f"fedcrypt serve did not start: {line!r}")
    return server, found.group(1), int(found.group(2))


def load(host: str, port: int, body: bytes, requests: int, concurrency: int) -> tuple[list[float], float, list[Any]]:
    """Send ``requests`` POST /predict in all from ``concurrency`` keep-alive connections."""
    latencies: list[float] = []
    answers: list[Any] = []
    lock = threading.Lock()
    remaining = [requests]

    def worker() -> None:
        connection = http.client.HTTPConnection(host, port, timeout=30)
        while True:
            with lock:
                if remaining[0] == 0:
                    break
                remaining[0] -= 1
            started = time.perf_counter()
            connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = json.loads(response.read())
            elapsed = time.perf_counter() - started
            if response.status != 200:
                raise RuntimeError(f"status {response.status}: {answer}")
            with lock:
                latencies.append(elapsed)
                if len(answers) < 5:
                    answers.append(answer)
        connection.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - started, answers


def in_process(model: torch.nn.Module, inputs: np.ndarray, repeats: int = 200) -> float:
    """Median seconds of the model's forward pass and softmax on ``inputs`` in this process."""
    tensor = torch.from_numpy(inputs)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            torch.softmax(model(tensor), dim=1)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(name: str, spec: ModelSpec, scratch: Path, requests: int, concurrency: int) -> dict[str, Any]:
    folder = scratch / name.split()[0]
    model = write_run(spec, folder)
    server, host, port = start_server(folder)
    rng = np.random.default_rng(0)  # benchmark inputs, not key material
    results: dict[str, Any] = {}
    try:
        for batch in (1, 32):
            inputs = rng.random((batch, *spec.input_shape), dtype=np.float32)
            body = json.dumps({"inputs": inputs.tolist()}).encode()
            load(host, port, body, 50, concurrency)  # warm-up
            latencies, seconds, answers = load(host, port, body, requests, concurrency)
            with torch.inference_mode():
                expected = model(torch.from_numpy(inputs)).argmax(dim=1).tolist()
            assert all(answer["predictions"] == expected for answer in answers), "served predictions differ"
            forward = in_process(model, inputs)
            p50 = statistics.median(latencies)
            results[f"batch_{batch}"] = {
                "requests": len(latencies), "concurrency": concurrency, "body_bytes": len(body),
                "requests_per_second": len(latencies) / seconds, "inputs_per_second": batch * len(latencies) / seconds,
                "p50_ms": p50 * 1e3, "p99_ms": float(np.percentile(latencies, 99)) * 1e3,
                "in_process_forward_ms": forward * 1e3, "p50_over_forward": p50 / forward,
            }
    finally:
        server.terminate()
        server.wait(timeout=10)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "serving.json")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, spec in MODELS.items():
            results[name] = measure(name, spec, Path(scratch), args.requests, args.concurrency)
    rows = []
    for name, by_batch in results.items():
        for batch, r in by_batch.items():
            rows.append((f"{name}, {batch.replace('_', ' ')}: requests/s (inputs/s)",
                         f"{r['requests_per_second']:.0f} ({r['inputs_per_second']:.0f})"))
            rows.append((f"{name}, {batch.replace('_', ' ')}: p50 / p99 latency (ms)", f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}"))
            rows.append((f"{name}, {batch.replace('_', ' ')}: in-process forward (ms); p50 / forward",
                         f"{r['in_process_forward_ms']:.3f}; {r['p50_over_forward']:.0f}x"))
    print(figure_table(rows))
    write_json(args.out, {"command": command_line(), "machine": machine_info(("torch", "fastapi", "uvicorn")),
                          "results": results})


if __name__ == "__main__":
    main()
