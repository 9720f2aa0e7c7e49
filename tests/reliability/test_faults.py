"""Issue 17's input and environment faults that need no Ray: each is one line naming the cause, exit code 2,
and nothing already written is touched. Each of these failed on the code before the fix (a wrong place, a
traceback, or a crash)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipelines.test_cli import one_error_line
from vitpipe.cluster.provenance import code_version
from vitpipe.pipelines.cli import main

pytestmark = pytest.mark.reliability
ROOT = Path(__file__).resolve().parents[2]


def _plan(tmp_path: Path, capsys: pytest.CaptureFixture[str], **top) -> str:
    config = {"work_dir": str(tmp_path / "work"), "tasks": {"faces": {"source": "faces"}}, **top}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["plan", str(path)]) == 2
    return one_error_line(capsys.readouterr().err)


def test_an_s3_work_dir_is_refused_not_created_as_a_local_folder(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    line = _plan(tmp_path, capsys, work_dir="s3://bucket/prefix")
    assert "work_dir" in line and "store: s3://" in line
    assert not (tmp_path / "s3:").exists()


@pytest.mark.parametrize(("field", "value"), [("store", "gs://bucket/x"), ("tracking_uri", "ftp://host/x")])
def test_other_uri_fields_are_checked_too(tmp_path: Path, capsys, field: str, value: str) -> None:
    assert field in _plan(tmp_path, capsys, **{field: value})


def test_a_task_name_that_is_no_valid_mlflow_key_fails_at_plan_time(tmp_path: Path, capsys) -> None:
    line = _plan(tmp_path, capsys, tasks={"../../x": {"source": "faces"}})
    assert "task name '../../x'" in line
    assert not (tmp_path / "work").exists()  # nothing was started: no MLflow DB, no run left RUNNING


def test_missing_and_one_class_folders_fail_at_plan_time(tmp_path: Path, capsys) -> None:
    assert "is not a directory" in _plan(tmp_path, capsys, tasks={"pets": {"source": f"imagefolder:{tmp_path}/no"}})
    (tmp_path / "one" / "cats").mkdir(parents=True)
    (tmp_path / "one" / "cats" / "a.png").write_bytes(b"x")
    line = _plan(tmp_path, capsys, tasks={"pets": {"source": f"imagefolder:{tmp_path / 'one'}"}})
    assert "at least two class folders" in line


def test_prepare_to_an_unreachable_s3_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    assert main(["data", "prepare", "--source", "faces", "--out", "s3://nobucket/x"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "s3://nobucket/x: cannot write the shards" in line


def test_an_undecodable_image_is_named_without_a_bytesio_repr(tmp_path: Path, capsys) -> None:
    from vitpipe.tasks.data.bundled import textures, write_imagefolder

    write_imagefolder(textures(seed=0), tmp_path / "imgs", per_class=5)
    (tmp_path / "imgs" / "brick" / "broken.jpg").write_bytes(b"GIF89a not really an image")
    out = str(tmp_path / "shards")
    assert main(["data", "prepare", "--source", f"imagefolder:{tmp_path / 'imgs'}", "--out", out]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "brick/broken.jpg: cannot decode image" in line and "BytesIO" not in line


def test_two_first_runs_create_the_sqlite_tracking_db_at_once(tmp_path: Path) -> None:
    """MLflow's first use of a SQLite DB migrates it; two runners starting together on a fresh work_dir both
    did, and one died with alembic's CommandError."""
    code = ("import sys; from vitpipe.cluster.tracking import Tracker; "
            "print(Tracker(sys.argv[1], 'race').experiment_id)")
    uri = f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in results] == [0, 0, 0], [err[-2000:] for _, _, err in results]
    assert len({out.strip() for _, out, _ in results}) == 1  # one experiment, seen by all three


def test_stage_keys_change_with_the_packages_that_shape_numerics() -> None:
    import numpy
    import timm
    import torch

    version = code_version()
    for name, module in (("torch", torch), ("timm", timm), ("numpy", numpy)):
        assert f"{name}={module.__version__.split('+')[0]}" in version or f"{name}={module.__version__}" in version
    assert "deepspeed=" in version


def test_stage_keys_change_with_an_uncommitted_edit_of_the_source(tmp_path: Path) -> None:
    from vitpipe.cluster.provenance import SOURCE_PACKAGES, source_digest

    for package in SOURCE_PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "a.py").write_text("x = 1\n")
    before = source_digest(tmp_path)
    (tmp_path / "tasks" / "a.py").write_text("x = 2\n")
    assert source_digest.__wrapped__(tmp_path) != before
    assert f";src={source_digest()[:16]};" in code_version()


BAD_CONFIGS = {
    "schema": ("stages: {finetune: {train: {steps: 0}}}", "stages.finetune.train.steps: Input should be greater"),
    "peft method": ("stages: {finetune: {methods: [{name: lora, r: -x}]}}", "stages.finetune.methods[0]: lora: r"),
    "wiring": ("stages: {evaluate: {}}", "stages.evaluate: it compares with and without ToCom: it needs stages"),
    "pruner": ("stages: {prune: {pruner: magnitude}}", "stages.prune.pruner: Input should be 'resrep' or 'csgd'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CONFIGS))
def test_a_bad_config_is_refused_before_torch_ray_or_mlflow_are_imported(tmp_path: Path, kind: str) -> None:
    """`vitpipe plan` answers a bad config in about a second because it imports none of the heavy packages."""
    text, message = BAD_CONFIGS[kind]
    path = tmp_path / "p.yaml"
    path.write_text(f"tasks: {{faces: {{source: faces}}}}\n{text}\n")
    probe = ("import sys\nfrom vitpipe.pipelines.cli import main\nrc = main(['plan', sys.argv[1]])\n"
             "print(rc, sorted(m for m in ('torch', 'ray', 'mlflow', 'timm', 'deepspeed') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.stdout.split() == ["2", "[]"], (done.stdout, done.stderr[-2000:])
    assert message in one_error_line(done.stderr)


def test_rays_own_messages_go_to_its_log_folder_and_a_lost_node_is_one_line(ray_local, capsys) -> None:
    """Ray's driver prints raylet / GCS messages through ray._private.worker.print_to_stdstream (its error
    listener thread), whatever log_to_driver says; the runner routes them."""
    import io

    import ray._private.worker as ray_worker

    from vitpipe.cluster.ray_connect import route_ray_messages

    out = io.StringIO()
    original = ray_worker.print_to_stdstream
    route_ray_messages(out)
    try:
        pool = "WARNING: 8 PYTHON worker processes have been started on node: ab12 with address: 10.0.0.2"
        lost = ("The node with node id: 5f3c and address: 10.0.0.3 and node name: 10.0.0.3 has been marked "
                "dead because the detector has missed too many heartbeats from it.\n" + "state dump line\n" * 40)
        for text in (pool, lost):
            ray_worker.print_to_stdstream({"lines": [text], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    finally:
        ray_worker.print_to_stdstream = original
    captured = capsys.readouterr()
    assert "heartbeats" not in captured.out + captured.err and "PYTHON worker" not in captured.out + captured.err
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitpipe: Ray reports a lost node: The node with node id: 5f3c")
    logged = Path(lines[0].rsplit("Ray's message: ", 1)[1].rstrip(")")).read_text()
    assert pool in logged and logged.count("state dump line") == 40


def test_a_full_disk_is_recognised_through_ray_and_reads_as_one_line(ray_local, tmp_path: Path) -> None:
    """/dev/full answers every write with ENOSPC: the real error, raised in a Ray task as a stage would."""
    import ray

    from vitpipe.cluster.retry import DiskFull, disk_full
    from vitpipe.cluster.tracking import _is_transient
    from vitpipe.pipelines.cli import _is_domain_error

    @ray.remote
    def write_a_shard() -> None:
        with open("/dev/full", "wb") as f:
            f.write(b"x" * 4096)
            f.flush()

    with pytest.raises(Exception) as raised:
        ray.get(write_a_shard.remote())
    full = disk_full(raised.value, str(tmp_path))
    assert isinstance(full, DiskFull) and _is_domain_error(full)
    message = str(full)
    assert message.startswith(f"disk full writing {tmp_path} (") and "MiB free on" in message
    assert "\n" not in message and "finished stages are kept" in message
    assert not _is_transient(raised.value)  # MLflow calls do not retry a full disk five times
    sqlite = type("OperationalError", (Exception,), {})("database or disk is full")
    assert disk_full(sqlite, "/tmp") is not None and disk_full(ValueError("bad value"), "/tmp") is None


LISTENERS = """
import sys, psutil, ray
from vitpipe.cluster.ray_connect import connect_ray
from vitpipe.pipelines.spec import load_config
cfg = load_config(sys.argv[1]).ray
connect_ray(cfg.address, cfg.num_cpus, cfg.num_gpus)
ray.get([ray.remote(lambda: 1).remote() for _ in range(2)])  # workers started too
pids = {psutil.Process().pid} | {c.pid for c in psutil.Process().children(recursive=True)}
listening = [c.laddr.ip for c in psutil.net_connections(kind="inet")
             if c.status == psutil.CONN_LISTEN and c.pid in pids]
print(len(listening), sorted(set(listening)))
"""


@pytest.mark.parametrize(("switch", "loopback"), [(None, True), ("1", False)])
def test_a_local_ray_listens_on_loopback_only(tmp_path: Path, switch: str | None, loopback: bool) -> None:
    """Every listening socket of the driver's Ray (GCS, raylet, agents, workers), in a fresh process."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    if switch is not None:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = switch  # the documented opt-out
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump({"name": "listeners", "work_dir": str(tmp_path / "w"),
                                      "tasks": {"digits": {"source": "digits"}}}))
    done = subprocess.run([sys.executable, "-c", LISTENERS, str(config)], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout.split(maxsplit=1)
    count, addresses = int(out[0]), eval(out[1])  # noqa: S307 - our own script's printed list
    assert count >= 4  # GCS, raylet, object manager, workers: the check has something to check
    assert (set(addresses) <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}) == loopback, addresses
