"""The runner on a cluster: GPU requests kept on request, preflight of S3 and MLflow, a killed training process.

(The CPU fallback of GPU requests and the 2-at-a-time fan-out are checked on test_runner.py's first run.)
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.pipelines.test_runner import statuses, write_config
from vitpipe.cluster.store import open_store
from vitpipe.pipelines.cli import main
from vitpipe.pipelines.dag import plan
from vitpipe.pipelines.runner import run
from vitpipe.pipelines.spec import load_config

FAST_FAIL = {"attempts": 2, "backoff_s": 0.1, "timeout_s": 2}


@pytest.fixture(autouse=True)
def _restore_mlflow_http_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Tracker sets MLflow's HTTP variables in this process; undo that after each test."""
    for name, default in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "120"),
                          ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")):
        monkeypatch.setenv(name, os.environ.get(name, default))


def test_gpu_fallback_off_keeps_the_gpu_request(tmp_path: Path) -> None:
    path = write_config(tmp_path, "nofallback")
    cfg = load_config(path, ("stages.finetune.resources.gpus_per_worker=1", "ray.gpu_fallback=false"))
    node = next(n for n, _, _ in plan(cfg) if n.kind == "finetune")
    assert node.demand()["GPU"] == 1  # the runner leaves it to the (autoscaling) cluster to provide


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("vitpipe: error: preflight: "), lines
    return lines[0]


def test_unreachable_s3_fails_preflight_in_one_line_and_writes_nothing(
        mlflow_server: str, s3_bucket: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    path = write_config(tmp_path, "nos3", tracking_uri=mlflow_server, store=s3_bucket, retry=FAST_FAIL)
    started = time.monotonic()
    assert main(["run", str(path)]) == 2
    assert time.monotonic() - started < 20
    line = one_error_line(capsys)
    assert s3_bucket in line and "endpoint http://127.0.0.1:1" in line and "after 2 tries" in line
    monkeypatch.undo()
    assert open_store(s3_bucket).list() == []
    assert MlflowClient(mlflow_server).get_experiment_by_name("test-nos3") is None
    assert not (tmp_path / "work").exists()


def test_unreachable_mlflow_fails_preflight_in_one_line_and_writes_nothing(
        s3_bucket: str, tmp_path: Path, capsys) -> None:
    path = write_config(tmp_path, "nomlflow", tracking_uri="http://127.0.0.1:1", store=s3_bucket, retry=FAST_FAIL)
    started = time.monotonic()
    assert main(["run", str(path)]) == 2
    assert time.monotonic() - started < 20
    line = one_error_line(capsys)
    assert "MLflow at http://127.0.0.1:1" in line and "after 2 tries" in line
    assert open_store(s3_bucket).list() == []
    assert not (tmp_path / "work").exists()


def processes(marker: str) -> dict[int, psutil.Process]:
    """Processes of this test session's Ray (descendants of this process) whose command line has `marker`."""
    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            if marker in " ".join(proc.cmdline()):
                found[proc.pid] = proc
        except psutil.Error:
            continue
    return found


# launcher -> (the process that trains, the file that says a checkpoint is registered for a resume)
TRAINING_PROCESS = {
    # the node's own Ray task (Ray titles it ray::<task name>); a checkpoint folder is renamed into place whole
    "auto": ("ray::finetune/digits/linear", "*/checkpoint_0*/digests.rank0.json"),
    # Ray Train writes its checkpoint manager's snapshot once it has registered a checkpoint (a checkpoint
    # folder alone may not be registered yet, and a worker killed before that restarts from step 0)
    "ray_train": ("RayTrainWorker", "*/checkpoint_manager_snapshot.json"),
}


@pytest.mark.parametrize("launcher", ["auto", "ray_train"])
def test_training_process_sigkilled_mid_stage_resumes_from_checkpoint(ray_local, tmp_path: Path,
                                                                      launcher: str) -> None:
    path = write_config(tmp_path, "sigkill", tasks=("digits",), steps=80)
    cfg = load_config(path, ("stages.finetune.train.checkpoint_every=20", "stages.finetune.train.log_every=10",
                             f"stages.finetune.resources.launcher={launcher}"))
    marker, registered = TRAINING_PROCESS[launcher]
    result: dict = {}
    driver = threading.Thread(target=lambda: result.update(summary=run(cfg, io.StringIO())), daemon=True)
    driver.start()

    checkpoints = Path(cfg.work_dir, "ray-train")  # one training run: the finetune node's
    deadline = time.monotonic() + 400
    while not list(checkpoints.glob(registered)):
        assert driver.is_alive() and time.monotonic() < deadline, "no checkpoint was written in time"
        time.sleep(0.2)
    victims = processes(marker)
    assert len(victims) == 1, victims
    (pid, victim), = victims.items()
    os.kill(pid, signal.SIGKILL)
    victim.wait(timeout=30)
    replaced = False
    while driver.is_alive() and time.monotonic() < deadline:
        replaced = replaced or any(p != pid for p in processes(marker))
        time.sleep(0.2)
    driver.join(timeout=1)
    assert not driver.is_alive(), "the pipeline did not finish in time"

    summary = result["summary"]
    assert summary.ok and statuses(summary)["finetune/digits/linear"] == "ran"
    assert replaced, "no new training process replaced the killed one"
    outcome = next(o for o in summary.outcomes if o.node.kind == "finetune")
    client = MlflowClient(cfg.tracking)
    child = outcome.manifest.mlflow_run_id
    assert client.get_run(child).info.status == "FINISHED"
    logged = [m.step for m in client.get_metric_history(child, "loss")]
    assert set(logged) == set(range(10, 81, 10))  # every logged step is there after the restart
    assert logged.count(10) == logged.count(20) == 1  # resumed from a checkpoint, not from step 0
