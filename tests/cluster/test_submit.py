"""What `vitpipe submit` ships: the job's entrypoint, runtime_env and working_dir (no cluster needed)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from vitpipe.cluster.provenance import git_commit
from vitpipe.cluster.submit import (
    COMMIT_STAMP,
    JOB_DIR,
    PROJECT_DIR,
    SubmitConfig,
    SubmitError,
    cluster_warnings,
    job_spec,
    project_requirements,
    staged_project,
)

ROOT = Path(__file__).resolve().parents[2]
ENVIRON = {"AWS_ENDPOINT_URL": "http://s3.internal:9000", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value", "HOME": "/root"}


def test_job_runs_the_shipped_config_with_overrides_and_forwards_only_named_variables() -> None:
    spec = job_spec("demo.yaml", "My Demo", ("stages.finetune.train.steps=5", "tasks={a: {source: faces}}"),
                    SubmitConfig(), ENVIRON, ("AWS_SECRET_ACCESS_KEY",), commit="abc123")
    assert shlex.split(spec.entrypoint) == [
        "python", "-m", "vitpipe.pipelines.cli", "run", f"{JOB_DIR}/demo.yaml", "--address", "auto",
        "--set", "stages.finetune.train.steps=5", "--set", "tasks={a: {source: faces}}"]
    assert spec.runtime_env == {"env_vars": {"AWS_ENDPOINT_URL": "http://s3.internal:9000",
                                             "AWS_SECRET_ACCESS_KEY": "s3cr3t-value"}}
    assert spec.forwarded == ("AWS_ENDPOINT_URL", "AWS_SECRET_ACCESS_KEY")
    assert spec.metadata == {"vitpipe.pipeline": "My Demo", "vitpipe.config": "demo.yaml",
                             "vitpipe.git_commit": "abc123"}
    assert spec.submission_id.startswith("vitpipe-my-demo-")
    with pytest.raises(SubmitError, match="--env MLFLOW_TRACKING_TOKEN: not set"):
        job_spec("demo.yaml", "demo", (), SubmitConfig(), ENVIRON, ("MLFLOW_TRACKING_TOKEN",))


def test_pip_runtime_env_installs_the_projects_dependencies_and_image_uri_is_passed_on() -> None:
    pip = job_spec("d.yaml", "d", (), SubmitConfig(runtime_env="pip"), {}).runtime_env["pip"]
    names = {r.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip() for r in pip["packages"]}
    assert {"torch", "ray", "mlflow", "deepspeed", "boto3"} <= names
    assert not any("pytest" in r or "moto" in r for r in pip["packages"])  # the [dev] extra stays out
    assert pip["packages"] == project_requirements()
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    for req in pip["packages"]:  # the tested versions, not pyproject's ranges
        name, _, version = req.partition("==")
        assert version and pins[name.split("[")[0]] == version, req
    image = job_spec("d.yaml", "d", (), SubmitConfig(image_uri="ghcr.io/acme/vitpipe:1"), {}).runtime_env
    assert image == {"env_vars": {}, "image_uri": "ghcr.io/acme/vitpipe:1"}


def test_staged_project_is_the_source_plus_config_and_commit_stamp(tmp_path: Path) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text("name: mine\n")
    with staged_project(ROOT, config, "c0ffee", ("benchmarks",)) as stage:
        shipped = {p.relative_to(stage).as_posix() for p in stage.rglob("*")}
        assert {"vitpipe/pyproject.toml", "vitpipe/pipelines/cli.py", "vitpipe/cluster/submit.py",
                f"{JOB_DIR}/mine.yaml"} <= shipped
        top = {p.split("/")[1] for p in shipped if p.startswith(f"{PROJECT_DIR}/")}
        assert not top & {".git", ".venv", "vitpipe-work", "benchmarks"}
        assert not {p for p in shipped if "__pycache__" in p or ".egg-info" in p}
        assert (stage / JOB_DIR / "mine.yaml").read_text() == "name: mine\n"
        # Without .git, the shipped tree still knows its commit, so stage keys match a local plan.
        assert (stage / PROJECT_DIR / COMMIT_STAMP).read_text().strip() == "c0ffee" == git_commit(stage / PROJECT_DIR)
    assert not stage.exists()
    with pytest.raises(SubmitError, match="not a vitpipe source checkout"):
        with staged_project(tmp_path, config, None, ()):
            pass


def test_warnings_for_stores_and_trackers_that_only_exist_on_one_node() -> None:
    assert cluster_warnings("s3://bucket/root", "http://mlflow:5000") == []
    local = cluster_warnings("vitpipe-work/artifacts", "sqlite:///vitpipe-work/mlflow.db")
    assert len(local) == 2 and "s3://" in local[0] and "MLflow server" in local[1]
    unset = cluster_warnings(None, None)
    assert len(unset) == 2 and "VITPIPE_STORE" in unset[0] and "MLFLOW_TRACKING_URI" in unset[1]
