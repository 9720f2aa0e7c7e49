"""Screenshots of what a user sees of a finished pipeline in the MLflow UI, for docs/mlflow.md.

    make run                                     # the demo, into ./vitpipe-work
    .venv/bin/python docs/screenshots.py         # -> docs/img/mlflow-*.png

Starts `mlflow server` on 127.0.0.1 over the work folder's SQLite database (nothing else is written to it)
and photographs its pages with headless Chromium (Debian: `apt-get install chromium`; or set CHROMIUM).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ML_VIEW = "workflowType=machine_learning"  # the UI's "Model training" view (its default is the GenAI one)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pages(client: MlflowClient, experiment: str) -> dict[str, str]:
    """name -> the UI route of the latest pipeline run's pages a user opens first."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        sys.exit(f"no experiment {experiment!r} in this database (run the pipeline first)")
    parent = client.search_runs([exp.experiment_id], "tags.`vitpipe.pipeline` != ''", max_results=1,
                                order_by=["start_time DESC"])
    if not parent:
        sys.exit(f"experiment {experiment!r} has no pipeline run")
    parent = parent[0]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    finetune = next(c for c in children if c.data.tags.get("vitpipe.stage.kind") == "finetune")
    base = f"#/experiments/{exp.experiment_id}"
    routes = {
        "runs": f"{base}/runs",
        "pipeline-run": f"{base}/runs/{parent.info.run_id}",
        "accuracy-table": f"{base}/runs/{parent.info.run_id}/artifacts/accuracy_heatmap.png",
        "finetune-run": f"{base}/runs/{finetune.info.run_id}",
        "finetune-metrics": f"{base}/runs/{finetune.info.run_id}/model-metrics",
        "logged-models": f"{base}/models",
    }
    registered = client.search_registered_models(max_results=1)
    if registered:
        version = registered[0].latest_versions[0]
        routes["registered-version"] = f"#/models/{registered[0].name}/versions/{version.version}"
    return routes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", default="vitpipe-work", help="the pipeline's work_dir (holding mlflow.db)")
    p.add_argument("--experiment", default="vitpipe-demo", help="the pipeline's experiment (the demo's by default)")
    p.add_argument("--out", default=str(ROOT / "docs" / "img"))
    p.add_argument("--wait", type=float, default=20.0, help="seconds of page time before each shot")
    args = p.parse_args()
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("headless Chromium not found (apt-get install chromium, or set CHROMIUM)")
    db = Path(args.work_dir, "mlflow.db").resolve()
    if not db.is_file():
        sys.exit(f"no MLflow database at {db} (make run first)")
    uri = f"sqlite:///{db}"
    routes = pages(MlflowClient(uri), args.experiment)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            sys.exit("mlflow server did not start")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            for name, route in routes.items():
                target = Path(args.out) / f"mlflow-{name}.png"
                subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                f"--user-data-dir={profile}", "--window-size=1600,1000",
                                f"--virtual-time-budget={int(args.wait * 1000)}", f"--screenshot={target}",
                                f"{url}/{route}?{ML_VIEW}"], check=True, capture_output=True, timeout=180)
                with Image.open(target) as shot:  # a 256-colour palette: a third of the bytes, same look
                    shot.convert("RGB").quantize(256).save(target, optimize=True)
                print(f"{target}  <- {route}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
