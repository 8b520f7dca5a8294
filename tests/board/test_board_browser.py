"""The board in a real headless browser (Debian's Chromium through Selenium): the runs table lists
recorded runs and filters them, a run's page draws its plots from its rounds, the compare view
overlays two runs, a running run's page picks up new rounds by itself, and no page logs a console
error. The runs are real: two short `fedcrypt run` simulations, one of them with DP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from typer.testing import CliRunner

from fedcrypt.board import create_app
from fedcrypt.cli.main import app
from fedcrypt.core.server import RoundRecord
from fedcrypt.serving.http import HttpServer
from fedcrypt.tracking.store import RunStore

REPO = Path(__file__).resolve().parents[2]
ROUNDS = 3
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> RunStore:
    folder = tmp_path_factory.mktemp("board")
    location = str(folder / "runs.sqlite")
    quickstart = (REPO / "examples" / "quickstart.toml").read_text()
    with_dp = quickstart.replace("[strategy]\n", '[strategy]\nweighting = "uniform"\n', 1) + (
        '\n[dp]\nnoise = "central"\nclip_norm = 1.0\nnoise_multiplier = 1.0\ndelta = 1e-5\n')
    (folder / "dp.toml").write_text(with_dp)
    for job, out in ((REPO / "examples" / "quickstart.toml", "plain"), (folder / "dp.toml", "dp")):
        result = CliRunner().invoke(app, ["run", str(job), "--rounds", str(ROUNDS), "--out", str(folder / out),
                                          "--store", location, "-q"])
        assert result.exit_code == 0, result.output
    return RunStore(location)


@pytest.fixture(scope="module")
def board(store: RunStore) -> Iterator[str]:
    with HttpServer(create_app(store, refresh_seconds=0.3)) as server:
        yield server.url


@pytest.fixture(scope="module")
def browser(chromium: tuple[str, str]) -> Iterator[webdriver.Chrome]:
    binary, driver = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    chrome.set_page_load_timeout(30)
    yield chrome
    chrome.quit()


def _open(browser: webdriver.Chrome, url: str, view: str) -> None:
    browser.get(url)
    WebDriverWait(browser, 15).until(lambda b: b.find_element(By.ID, "app").get_attribute("data-ready") == view)


def _no_console_errors(browser: webdriver.Chrome) -> None:
    errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]
    assert errors == []


def _series(browser: webdriver.Chrome, canvas_id: str) -> list[list[Any]]:
    """Each dataset of the chart on a canvas, as its y values (bars: the values)."""
    return browser.execute_script(
        "const chart = Chart.getChart(document.getElementById(arguments[0]));"
        "return chart.data.datasets.map(d => d.data.map(p => (p !== null && typeof p === 'object') ? p.y : p));",
        canvas_id)


def _painted(browser: webdriver.Chrome, canvas_id: str) -> int:
    """How many pixels of a canvas are not transparent: a drawn chart has thousands."""
    return browser.execute_script(
        "const c = document.getElementById(arguments[0]);"
        "const pixels = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let painted = 0; for (let i = 3; i < pixels.length; i += 4) if (pixels[i]) painted++; return painted;",
        canvas_id)


def test_runs_table_lists_and_filters_the_runs(browser: webdriver.Chrome, board: str, store: RunStore) -> None:
    _open(browser, board + "/", "runs")
    rows = browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")
    assert sorted(row.get_attribute("data-run") for row in rows) == sorted(run.id for run in store.runs())
    assert "none+dp" in browser.find_element(By.ID, "runs").text and "finished" in rows[0].text
    _open(browser, board + "/?mechanism=none%2Bdp", "runs")
    (row,) = browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")
    assert row.get_attribute("data-run") == store.runs(mechanism="none+dp")[0].id
    _open(browser, board + "/?status=failed", "runs")
    assert "No runs match" in browser.find_element(By.ID, "no-runs").text
    _no_console_errors(browser)


def test_a_run_page_draws_its_plots(browser: webdriver.Chrome, board: str, store: RunStore) -> None:
    run = store.runs(mechanism="none")[0]
    rounds = store.get(run.id).rounds
    _open(browser, f"{board}/runs/{run.id}", "run")
    accuracy, loss, train_loss = _series(browser, "chart-metrics")
    assert accuracy == [r["accuracy"] for r in rounds] and loss == [r["loss"] for r in rounds]
    assert len(train_loss) == ROUNDS
    up, down = _series(browser, "chart-bytes")
    assert up == [r["bytes_up"] / 1e6 for r in rounds] and down == [r["bytes_down"] / 1e6 for r in rounds]
    phases = _series(browser, "chart-time")
    assert phases[0] == [r["train_seconds"] for r in rounds] and len(phases) == 6
    for canvas in ("chart-metrics", "chart-bytes", "chart-time"):
        assert _painted(browser, canvas) > 2000, canvas
    assert browser.find_element(By.ID, "no-dp").is_displayed()  # no ε without DP
    assert 'name = "quickstart"' in browser.find_element(By.ID, "config").text
    _no_console_errors(browser)


def test_a_dp_run_plots_its_epsilon(browser: webdriver.Chrome, board: str, store: RunStore) -> None:
    run = store.runs(mechanism="none+dp")[0]
    epsilons = [r["dp_epsilon"] for r in store.get(run.id).rounds]
    _open(browser, f"{board}/runs/{run.id}", "run")
    assert _series(browser, "chart-epsilon") == [epsilons] and epsilons == sorted(epsilons) and epsilons[0] > 0
    assert _painted(browser, "chart-epsilon") > 2000
    assert not browser.find_elements(By.ID, "no-dp")
    _no_console_errors(browser)


def test_compare_view_overlays_the_selected_runs(browser: webdriver.Chrome, board: str, store: RunStore) -> None:
    _open(browser, board + "/", "runs")
    button = browser.find_element(By.ID, "compare-selected")
    assert not button.is_enabled()
    for box in browser.find_elements(By.CSS_SELECTOR, "#runs tbody input[type=checkbox]"):
        box.click()
    button.click()
    WebDriverWait(browser, 15).until(lambda b: b.find_element(By.ID, "app").get_attribute("data-ready") == "compare")
    runs = store.runs()
    assert sorted(browser.current_url.split("ids=")[1].split("%2C") if "%2C" in browser.current_url
                  else browser.current_url.split("ids=")[1].split(",")) == sorted(run.id for run in runs)
    for canvas in ("compare-accuracy", "compare-loss", "compare-bytes", "compare-time", "compare-epsilon"):
        series = _series(browser, canvas)
        assert len(series) == 2 and all(len(values) in (0, ROUNDS) for values in series), canvas
        assert _painted(browser, canvas) > 2000, canvas
    accuracies = sorted(_series(browser, "compare-accuracy"))
    assert accuracies == sorted([r["accuracy"] for r in store.get(run.id).rounds] for run in runs)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#compared tbody tr")) == 2
    _no_console_errors(browser)


def test_a_running_run_updates_live(browser: webdriver.Chrome, board: str, store: RunStore, tmp_path: Path) -> None:
    run_id = store.start(job="live", mechanism="ckks", kind="server", planned_rounds=3, run_dir=tmp_path, config="")
    store.add_round(run_id, RoundRecord(1, accuracy=0.25, seconds=1.0))
    _open(browser, f"{board}/runs/{run_id}", "run")
    assert _series(browser, "chart-metrics")[0] == [0.25]
    store.add_round(run_id, RoundRecord(2, accuracy=0.5, seconds=1.0))
    store.add_round(run_id, RoundRecord(3, accuracy=0.75, seconds=1.0))
    store.finish(run_id, None)
    deadline = time.monotonic() + 15
    while _series(browser, "chart-metrics")[0] != [0.25, 0.5, 0.75] or "finished" not in _badge(browser):
        assert time.monotonic() < deadline, "the page did not pick up the new rounds"
        time.sleep(0.1)
    assert "3/3" in browser.find_element(By.ID, "facts").text
    _no_console_errors(browser)


def _badge(browser: webdriver.Chrome) -> str:
    return browser.find_element(By.CSS_SELECTOR, "h1 .status").text
