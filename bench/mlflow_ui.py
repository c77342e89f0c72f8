"""Screenshot an MLflow experiment's runs page, parent runs expanded, in headless Chromium
(``page_text`` opens any other page: a run, the model registry).

    .venv/bin/python bench/mlflow_ui.py sqlite:///bench/out/fidelity-small/mlflow.db fidelity out.png

Starts a light MLflow server on a free 127.0.0.1 port over the store, opens the experiment in
Debian's Chromium (driven by Playwright, no browser download), expands the parent runs so their
child runs show, saves the screenshot and prints the run names the page lists. Then it saves the
first student's run page (``out-run.png``: metrics, params, inputs, logged model) and the model
registry (``out-models.png``). The server is stopped whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling Google on a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
EXPAND = "button[data-component-id*='runnamecellrenderer']"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(tracking_uri: str, log: Path, artifacts: Path | None = None):
    """A light MLflow server (1 worker, no job runner) on 127.0.0.1; yields its base URL. With
    ``artifacts``, it stores the artifacts that clients upload to it there."""
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    mlflow = Path(sys.executable).with_name("mlflow")
    extra = ["--artifacts-destination", str(artifacts)] if artifacts else []
    with open(log, "w") as fh:
        server = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                   "--backend-store-uri", tracking_uri, *extra], env=env, stdout=fh,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"MLflow server did not come up: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)


@contextlib.contextmanager
def _page():
    """A 1600x1000 page of Debian's headless Chromium, closed whatever happens."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1600, "height": 1000})
        finally:
            browser.close()


def _screenshot(page, png: Path) -> None:
    page.wait_for_timeout(500)  # let the page finish laying out before the picture
    png.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(png), full_page=True)


def capture(base_url: str, experiment_id: str, parent_names: list[str], png: Path,
            child_names: list[str] = (), timeout_s: float = 90) -> str:
    """Open the runs page, expand each named parent, wait for ``child_names``, screenshot; returns the grid text."""
    with _page() as page:
        page.goto(f"{base_url}/#/experiments/{experiment_id}/runs")
        for name in parent_names:
            row = page.locator("[role=row]", has_text=name).first
            row.wait_for(timeout=timeout_s * 1000)
            row.locator(EXPAND).click()
        for name in child_names:
            page.locator("[role=row]", has_text=name).first.wait_for(timeout=timeout_s * 1000)
        _screenshot(page, png)
        return page.locator("[role=grid]").first.inner_text()


def page_text(base_url: str, route: str, wait_for: list[str], png: Path, timeout_s: float = 90) -> str:
    """Open ``base_url/#/route`` (a run page, ``models``, ...), wait until every text of ``wait_for``
    shows, screenshot it and return the page's text."""
    with _page() as page:
        page.goto(f"{base_url}/#/{route}")
        for text in wait_for:
            page.get_by_text(text).first.wait_for(timeout=timeout_s * 1000)
        _screenshot(page, png)
        return page.locator("body").inner_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tracking_uri")
    parser.add_argument("experiment")
    parser.add_argument("png", type=Path)
    parser.add_argument("--expand", type=int, default=1, help="how many pipeline parent runs to expand (default 1)")
    args = parser.parse_args()

    from mlflow import MlflowClient

    client = MlflowClient(args.tracking_uri)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        sys.exit(f"error: no experiment {args.experiment!r} in {args.tracking_uri}")
    parents = client.search_runs([exp.experiment_id], "tags.`metakd.stage` = 'pipeline'",
                                 order_by=["attributes.start_time ASC"])[:args.expand]
    students = client.search_runs([exp.experiment_id], "tags.`metakd.stage` = 'student'", max_results=1,
                                  order_by=["attributes.start_time ASC"])
    models = sorted({m.name for m in client.search_registered_models()})
    with mlflow_server(args.tracking_uri, args.png.with_suffix(".server.log")) as url:
        text = capture(url, exp.experiment_id, [r.info.run_name for r in parents], args.png)
        shots = [args.png]
        if students:  # a student's run page: its metrics, params, inputs and logged model
            run = students[0]
            page_text(url, f"experiments/{exp.experiment_id}/runs/{run.info.run_id}", [run.info.run_name],
                      args.png.with_name(f"{args.png.stem}-run.png"))
            shots.append(args.png.with_name(f"{args.png.stem}-run.png"))
        if models:  # the model registry
            page_text(url, "models", models, args.png.with_name(f"{args.png.stem}-models.png"))
            shots.append(args.png.with_name(f"{args.png.stem}-models.png"))
    print(text)
    print(f"screenshots: {', '.join(map(str, shots))}")


if __name__ == "__main__":
    main()
