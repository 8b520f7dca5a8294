"""The web board: a runs table, a page per run with its plots, and a compare view.

The pages are one static HTML shell and ``board.js``, drawing with Chart.js shipped in
``static/vendor`` (no CDN: the board works offline). The script reads a small JSON API:

* ``GET /api/runs?mechanism=&status=&limit=``: runs, newest first, and the recorded mechanisms;
* ``GET /api/runs/{id}?after=N``: one run (with its job TOML) and its rounds numbered above N,
  which a page showing a running run asks for every few seconds (live updates).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from fedcrypt import __version__
from fedcrypt.tracking.store import RunNotFound, RunStore, RunSummary, StoreError

_STATIC = resources.files("fedcrypt.board") / "static"


def create_app(store: RunStore, *, refresh_seconds: float = 2.0) -> FastAPI:
    """The board over ``store``; pages showing running runs poll every ``refresh_seconds``."""
    if refresh_seconds <= 0:
        raise ValueError(f"refresh_seconds must be > 0, got {refresh_seconds}")
    app = FastAPI(title="fedcrypt board", version=__version__, docs_url="/api/docs", redoc_url=None)
    app.mount("/static", StaticFiles(directory=str(_STATIC)), name="static")
    shell = (_STATIC / "board.html").read_text(encoding="utf-8").replace(
        "{{refresh_ms}}", str(round(refresh_seconds * 1000))).replace("{{version}}", __version__)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    @app.get("/runs/{run_id}", response_class=HTMLResponse, include_in_schema=False)
    @app.get("/compare", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return shell

    @app.get("/api/runs")
    def runs(
        mechanism: str | None = None,
        status: Literal["running", "finished", "failed"] | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    ) -> dict[str, Any]:
        with _store_errors():
            found = store.runs(mechanism=mechanism or None, status=status, limit=limit)
            return {"runs": [_summary(run, config=False) for run in found], "mechanisms": store.mechanisms()}

    @app.get("/api/runs/{run_id}")
    def run(run_id: str, after: Annotated[int, Query(ge=0)] = 0) -> dict[str, Any]:
        with _store_errors():
            detail = store.get(run_id, after=after)
        return {"run": _summary(detail.run, config=True), "rounds": detail.rounds}

    return app


@contextmanager
def _store_errors() -> Iterator[None]:
    """A missing run answers 404, a failing store 503, both with the store's one-line message."""
    try:
        yield
    except RunNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except StoreError as exc:
        raise HTTPException(503, str(exc)) from None


def _summary(run: RunSummary, *, config: bool) -> dict[str, Any]:
    row = asdict(run)
    row["seconds"] = run.seconds
    if not config:
        del row["config"]
    return row
