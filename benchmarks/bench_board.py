"""The board's render time for a 1,000-round run (goal: under 1 s), in headless Chromium.

A run store in a temporary SQLite file gets runs whose every round has every field the board
plots (accuracy, both losses, bytes both ways, the five phases, ε), so a run page draws all four
charts. The board runs in this process (uvicorn on loopback, in a thread); Debian's Chromium,
driven by Selenium, opens a page ``--loads`` times. Render time is the page's own clock from
navigation start to the moment its charts are drawn (``data-render-ms``, set by board.js after
the last chart), so it covers fetching the page, Chart.js, the API call and drawing. The same
page for a 10-round run, measured in the same run, is the baseline: the ratio is what 1,000
rounds cost. The compare view overlaying three 1,000-round runs and the API call alone are
reported too. Needs Chromium and ChromeDriver (``. .ci/services`` installs them).
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, command_line, figure_table, machine_info, write_json
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from fedcrypt.board import create_app
from fedcrypt.core.server import RoundRecord
from fedcrypt.serving.http import HttpServer
from fedcrypt.tracking.store import RunStore

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1000")


def record_run(store: RunStore, rounds: int, mechanism: str, scratch: Path) -> str:
    """A finished run with ``rounds`` rounds of plausible figures in every plotted field."""
    run_id = store.start(job=f"bench-{rounds}", mechanism=mechanism, kind="simulation", planned_rounds=rounds,
                         run_dir=scratch, config='[job]\nname = "bench"\n')
    for n in range(1, rounds + 1):
        progress = 1 - math.exp(-n / (rounds / 8))
        store.add_round(run_id, RoundRecord(
            n, sampled=10, succeeded=10, bytes_up=int(3.6e6 + n), bytes_down=int(3.6e6), seconds=0.9 + 0.1 * (n % 7) / 7,
            train_seconds=0.5, protect_seconds=0.15, aggregate_seconds=0.1, recover_seconds=0.05, eval_seconds=0.05,
            train_loss=2.3 * (1 - progress) + 0.05, loss=2.3 * (1 - progress) + 0.1, accuracy=0.1 + 0.88 * progress,
            mechanism={"dp_epsilon": 0.05 * math.sqrt(n)}))
    store.finish(run_id, None)
    return run_id


def render_ms(browser: webdriver.Chrome, url: str, view: str, loads: int) -> list[float]:
    times = []
    for _ in range(loads):
        browser.get(url)
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "app").get_attribute("data-ready") == view)
        times.append(float(browser.find_element(By.ID, "app").get_attribute("data-render-ms")))
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    if errors:
        raise RuntimeError(f"console errors on {url}: {errors}")
    return times


def api_ms(url: str, repeats: int = 10) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as answer:
            size = len(answer.read())
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--loads", type=int, default=7, help="page loads per view (the median is reported)")
    parser.add_argument("--chromium", default=shutil.which("chromium"))
    parser.add_argument("--chromedriver", default=shutil.which("chromedriver"))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "board.json")
    args = parser.parse_args()
    if not args.chromium or not args.chromedriver:
        parser.error("needs Chromium and ChromeDriver: `. .ci/services` installs them, or pass --chromium/--chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = args.chromium
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        store = RunStore(str(Path(scratch) / "runs.sqlite"))
        small = record_run(store, 10, "none", Path(scratch))
        large = [record_run(store, args.rounds, mechanism, Path(scratch)) for mechanism in ("none", "ckks", "batchcrypt")]
        browser = webdriver.Chrome(options=options, service=Service(args.chromedriver))
        try:
            with HttpServer(create_app(store)) as board:
                render_ms(browser, f"{board.url}/runs/{small}", "run", 2)  # warm-up: caches, JIT
                pages = {
                    "run page, 10 rounds": (f"{board.url}/runs/{small}", "run"),
                    f"run page, {args.rounds} rounds": (f"{board.url}/runs/{large[0]}", "run"),
                    f"compare view, 3 x {args.rounds} rounds": (f"{board.url}/compare?ids={','.join(large)}", "compare"),
                    "runs table, 4 runs": (f"{board.url}/", "runs"),
                }
                for name, (url, view) in pages.items():
                    times = render_ms(browser, url, view, args.loads)
                    results[name] = {"median_ms": statistics.median(times), "max_ms": max(times), "loads": times}
                results["api"] = dict(zip(("median_ms", "bytes"), api_ms(f"{board.url}/api/runs/{large[0]}")))
        finally:
            browser.quit()
    baseline = results["run page, 10 rounds"]["median_ms"]
    rows = [(f"{name}: render (median / max ms)", f"{r['median_ms']:.0f} / {r['max_ms']:.0f}")
            for name, r in results.items() if name != "api"]
    rows.append((f"run page {args.rounds} rounds / 10 rounds", f"{results[f'run page, {args.rounds} rounds']['median_ms'] / baseline:.2f}x"))
    rows.append((f"GET /api/runs/ID, {args.rounds} rounds (median ms, KB)",
                 f"{results['api']['median_ms']:.1f}, {results['api']['bytes'] / 1e3:.0f}"))
    print(figure_table(rows))
    write_json(args.out, {"command": command_line(), "machine": machine_info(("fastapi", "uvicorn", "selenium")),
                          "chromium": browser.capabilities.get("browserVersion"), "results": results})


if __name__ == "__main__":
    main()
