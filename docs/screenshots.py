"""Screenshots of what a user sees in the MLflow UI after `regmix run`.

Starts `mlflow server` on the run's store (at http://127.0.0.1:5000, as `mlflow ui`), waits
for /health, and has headless Chromium, driven over the DevTools protocol, save PNGs of: the
experiment page (the runs table), MLflow's compare view of a few proxy runs, the parent run's
page, its report.html and report.md in the artifact viewer, and what a first visit to the
experiment shows.

    mkdir -p /tmp/shots-run && cd /tmp/shots-run && regmix run --config configs/tiny.yaml
    python docs/screenshots.py --tracking-uri sqlite:////tmp/shots-run/mlruns/mlflow.db \
        --experiment regmix-tiny --out docs/screenshots

Needs `chromium` on PATH (Debian: `apt-get install -y chromium`) and websocket-client (pinned
in constraints.txt: kubernetes needs it; listed in the dev extra).
"""

import argparse
import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

WIDTH, HEIGHT = 1600, 1000  # the browser window; a Shot may be taller
PROXY_RUNS_COMPARED = 4
# The single-page app renders after its fetches: a shot waits until the page's text has not
# changed for SETTLE_S (then CHARTS_S more for plots to draw), or RENDER_TIMEOUT_S at most.
SETTLE_S, CHARTS_S, RENDER_TIMEOUT_S = 3, 2, 60
# What a user who has clicked the UI's first-visit prompts away has in localStorage: the
# "Model training" workflow (not GenAI), the assistant panel closed, the tip popover seen.
# (The UI's useLocalStorage keys are `<key>_v<version>`, values JSON.)
RETURNING_USER_STORAGE = {
    "mlflow.workflowType_v1": "machine_learning",
    "mlflow.assistant.panelOpen_v1": False,
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
    "mlflow.detectIssues.guidanceShown_v1": True,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_url(url: str, process: subprocess.Popen, what: str, timeout_s: float = 120) -> bytes:
    """The body of `url` once it answers 200 (the process must stay up meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{what} exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return response.read()
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"{what}: no answer from {url} after {timeout_s:.0f} s")


@contextmanager
def running(command: list[str], ready_url: str, what: str):
    """Run a server process until the block ends; yields its ready_url's first answer."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield wait_for_url(ready_url, process, what)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def mlflow_server(tracking_uri: str):
    """An `mlflow server` on the store, at `mlflow ui`'s address (where the run's report.md
    links its images); yields its base URL."""
    port = 5000
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            sys.exit(f"port {port} is taken: stop what listens there (a `mlflow ui`?) first")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    base_url = f"http://127.0.0.1:{port}"
    with running(command, f"{base_url}/health", "mlflow server"):
        yield base_url


class Browser:
    """A headless Chromium tab, driven over the DevTools protocol (one command at a time)."""

    def __init__(self, websocket_url: str):
        import websocket  # websocket-client

        self.socket = websocket.create_connection(websocket_url, timeout=120,
                                                  suppress_origin=True)
        self.last_id = 0

    def call(self, method: str, **params) -> dict:
        self.last_id += 1
        self.socket.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            message = json.loads(self.socket.recv())
            if message.get("id") == self.last_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression,
                         returnByValue=True)["result"].get("value")

    def open(self, url: str) -> None:
        """Load the app afresh: going from one '#' route to another would keep its state."""
        self.call("Page.navigate", url="about:blank")
        self.call("Page.navigate", url=url)

    def wait_until_rendered(self) -> None:
        text, unchanged_since = None, time.monotonic()
        deadline = time.monotonic() + RENDER_TIMEOUT_S
        while time.monotonic() < deadline:
            now_text = self.evaluate("document.body ? document.body.innerText : ''")
            if now_text != text:
                text, unchanged_since = now_text, time.monotonic()
            elif text and time.monotonic() - unchanged_since >= SETTLE_S:
                break
            time.sleep(0.5)
        time.sleep(CHARTS_S)

    def save_png(self, png: Path) -> None:
        png.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))


@contextmanager
def chromium():
    """A headless Chromium with a fresh profile; yields a Browser on its first tab."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or sys.exit(
        "no chromium on PATH (apt-get install -y chromium)")
    port = free_port()
    with tempfile.TemporaryDirectory() as profile:
        command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   "--no-first-run", f"--user-data-dir={profile}",
                   f"--window-size={WIDTH},{HEIGHT}", f"--remote-debugging-port={port}",
                   "about:blank"]
        with running(command, f"http://127.0.0.1:{port}/json/version", "chromium"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as response:
                tab = next(t for t in json.load(response) if t["type"] == "page")
            yield Browser(tab["webSocketDebuggerUrl"])


@dataclass
class Shot:
    png: str
    route: str  # the UI route, after '#'
    height: int = HEIGHT  # taller than the window for pages whose story goes on below it
    click: str | None = None  # a CSS selector clicked before the shot


# The expander of a parent run's row in the runs table (it shows the child runs)
EXPAND_RUN_ROW = '[data-component-id$="runnamecellrenderer.tsx_46"]'


def shots_of(tracking_uri: str, experiment_name: str) -> list[Shot]:
    """What to shoot for the experiment's latest pipeline run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        sys.exit(f"no experiment '{experiment_name}' at {tracking_uri}")
    exp_id = experiment.experiment_id
    parents = client.search_runs([exp_id], "tags.`regmix.stage` = 'pipeline'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        sys.exit(f"experiment '{experiment_name}' has no pipeline (parent) run")
    parent = parents[0]
    proxies = client.search_runs(
        [exp_id], "tags.`regmix.stage` = 'proxy' and tags.`regmix.pipeline_run` = "
                  f"'{parent.data.tags['regmix.pipeline_run']}'",
        order_by=["attributes.start_time ASC"], max_results=PROXY_RUNS_COMPARED)
    compared = urllib.parse.urlencode({
        "runs": json.dumps([run.info.run_id for run in proxies]),
        "experiments": json.dumps([exp_id])})
    parent_page = f"/experiments/{exp_id}/runs/{parent.info.run_id}"
    return [
        Shot("experiment.png", f"/experiments/{exp_id}"),
        Shot("experiment-expanded.png", f"/experiments/{exp_id}", click=EXPAND_RUN_ROW),
        Shot("compare-proxies.png", f"/compare-runs?{compared}", height=2200),
        Shot("parent-run.png", parent_page, height=1800),
        Shot("report-html.png", f"{parent_page}/artifacts/report/report.html", height=2300),
        Shot("report-md.png", f"{parent_page}/artifacts/report/report.md", height=1400),
    ]


def shoot(browser: "Browser", base_url: str, shot: Shot, png: Path) -> None:
    browser.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=shot.height,
                 deviceScaleFactor=1, mobile=False)
    browser.open(f"{base_url}/#{shot.route}")
    browser.wait_until_rendered()
    if shot.click:
        if not browser.evaluate(f"(e => e ? (e.click(), true) : false)"
                                f"(document.querySelector({json.dumps(shot.click)}))"):
            print(f"warning: {shot.png}: nothing to click at {shot.click}", file=sys.stderr)
        browser.wait_until_rendered()
    browser.save_png(png)
    print(f"{png}  <- {base_url}/#{shot.route}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True, help="sqlite:///PATH/mlflow.db")
    parser.add_argument("--experiment", required=True, help="the experiment (the config's name)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNGs")
    args = parser.parse_args()

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    shots = shots_of(args.tracking_uri, args.experiment)
    with mlflow_server(args.tracking_uri) as base_url, chromium() as browser:
        # A fresh profile first: what a user's first visit to the experiment looks like
        shoot(browser, base_url, Shot("first-visit.png", shots[0].route), out / "first-visit.png")
        for key, value in RETURNING_USER_STORAGE.items():
            browser.evaluate(f"localStorage.setItem({json.dumps(key)}, {json.dumps(json.dumps(value))})")
        for shot in shots:
            shoot(browser, base_url, shot, out / shot.png)

if __name__ == "__main__":
    main()
