"""Submit a pipeline to a Ray cluster as a Ray Job, and follow it (status, logs).

The job's working_dir holds a copy of the project as `vitpipe/` (without .venv, work dirs, caches and .git; with
a stamp of the git commit, so the job computes the same stage keys as a local `vitpipe plan` of the same
checkout) and the pipeline YAML in `vitpipe-job/`. Its entrypoint is `python -m vitpipe.pipelines.cli run ...`
in the working_dir, which Ray puts first on the job's and its workers' sys.path: the shipped code, never an older
vitpipe installed on the nodes. The runtime environment is either the
nodes' own ("image": ray_cluster.yaml's setup_commands or a Docker image installed vitpipe's
dependencies) or a per-job virtualenv that Ray builds from vitpipe's dependencies ("pip").
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

from pydantic import BaseModel, ConfigDict

from vitpipe.cluster.fs import is_s3
from vitpipe.cluster.provenance import COMMIT_STAMP, PACKAGE_ROOT

JOB_DIR = "vitpipe-job"  # inside the shipped working_dir: the pipeline YAML
PROJECT_DIR = "vitpipe"  # inside the shipped working_dir: the project, importable as the vitpipe namespace
DEFAULT_EXCLUDES = (".git", ".venv", "venv", "vitpipe-work", "__pycache__", "*.pyc", "*.egg-info",
                    ".pytest_cache", ".ruff_cache", ".mypy_cache", "mlruns", "build", "dist")
# Not secret, and what a job needs to find the same S3 endpoint and MLflow server as the submitter.
DEFAULT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
               "VITPIPE_STORE", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(Exception):
    """Submitting or following a Ray Job failed; the message names the cluster address or the job."""


class SubmitConfig(BaseModel):
    """The pipeline YAML's `submit:` section: how `vitpipe submit` packages a run for a cluster."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    runtime_env: Literal["image", "pip"] = "image"
    image_uri: str | None = None  # "image" only: run the job in this container (Ray's image_uri, needs podman)
    env: tuple[str, ...] = DEFAULT_ENV  # environment variables forwarded to the job when set here
    excludes: tuple[str, ...] = ()  # more file/dir name globs kept out of the shipped working_dir


@dataclass(frozen=True)
class JobSpec:
    """Everything `JobSubmissionClient.submit_job` receives, except the staged working_dir."""

    submission_id: str
    entrypoint: str
    runtime_env: dict
    metadata: dict[str, str]
    forwarded: tuple[str, ...]  # names only: values are never printed


def job_spec(config_name: str, pipeline: str, overrides: tuple[str, ...], cfg: SubmitConfig,
             environ: Mapping[str, str], extra_env: tuple[str, ...] = (), commit: str | None = None) -> JobSpec:
    """The job for one pipeline YAML (`config_name` inside JOB_DIR) with `--set` overrides.

    Variables named in `cfg.env` are forwarded when set in `environ`; those in `extra_env` (the CLI's
    --env) must be set. Values go into the job's runtime_env, which the cluster's dashboard shows:
    prefer instance roles or the nodes' own environment for long-lived credentials.
    """
    missing = [name for name in extra_env if name not in environ]
    if missing:
        raise SubmitError(f"--env {missing[0]}: not set in this environment")
    names = tuple(dict.fromkeys(n for n in (*cfg.env, *extra_env) if n in environ))
    args = ["python", "-m", "vitpipe.pipelines.cli", "run", f"{JOB_DIR}/{config_name}", "--address", "auto"]
    for assignment in overrides:
        args += ["--set", assignment]
    runtime_env: dict = {"env_vars": {n: environ[n] for n in names}}
    if cfg.runtime_env == "pip":
        runtime_env["pip"] = {"packages": project_requirements(), "pip_check": False}
    elif cfg.image_uri:
        runtime_env["image_uri"] = cfg.image_uri
    slug = re.sub(r"[^a-z0-9-]+", "-", pipeline.lower()).strip("-") or "pipeline"
    submission_id = f"vitpipe-{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    metadata = {"vitpipe.pipeline": pipeline, "vitpipe.config": config_name, "vitpipe.git_commit": commit or ""}
    return JobSpec(submission_id, shlex.join(args), runtime_env, metadata, names)


def project_requirements(constraints: Path = PACKAGE_ROOT / "constraints.txt") -> list[str]:
    """vitpipe's runtime dependencies as pip requirement strings (extras such as [dev] left out), each pinned
    to the version constraints.txt tests (`name[extras]==version`), so a job never runs untested versions."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("vitpipe") or []
    except PackageNotFoundError as err:
        raise SubmitError("runtime_env pip: vitpipe is not installed here, so its dependencies are "
                          "unknown (pip install -e . first)") from err
    pins = {}
    if constraints.is_file():
        for line in constraints.read_text().splitlines():
            name, sep, version = line.split("#")[0].strip().partition("==")
            if sep:
                pins[_canonical(name)] = version.strip()
    pinned = []
    for req in (r for r in reqs if "extra ==" not in r):
        name = re.match(r"[A-Za-z0-9._-]+(\[[^\]]*\])?", req).group(0)
        version = pins.get(_canonical(name.split("[")[0]))
        pinned.append(f"{name}=={version}" if version else req)
    return pinned


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@contextmanager
def staged_project(root: Path, config: Path, commit: str | None, excludes: tuple[str, ...]) -> Iterator[Path]:
    """A temporary working_dir to ship: the project as PROJECT_DIR (with the commit stamp), the YAML in JOB_DIR."""
    if not (root / "pyproject.toml").is_file():
        raise SubmitError(f"{root}: not a vitpipe source checkout (no pyproject.toml); vitpipe submit ships "
                          "the project's source, so run it from a checkout installed with pip install -e .")
    with tempfile.TemporaryDirectory(prefix="vitpipe-submit-") as tmp:
        stage = Path(tmp) / "job"
        project = stage / PROJECT_DIR
        shutil.copytree(root, project, ignore=shutil.ignore_patterns(*DEFAULT_EXCLUDES, *excludes), symlinks=True)
        (stage / JOB_DIR).mkdir()
        shutil.copyfile(config, stage / JOB_DIR / config.name)
        if commit:
            (project / COMMIT_STAMP).write_text(commit + "\n")
        yield stage


@contextmanager
def _explicit_address(address: str | None) -> Iterator[None]:
    """Ray lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override an explicit address; here --address wins."""
    names = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    saved = {n: os.environ.pop(n) for n in names if address and n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _api_errors() -> tuple[type[Exception], ...]:
    """What the Jobs API client raises for an unreachable cluster, a refused request or a bad token."""
    from ray.exceptions import RayError

    return ConnectionError, RuntimeError, ValueError, RayError


def _use_local_token() -> None:
    """As `ray start` does: with RAY_AUTH_MODE unset, a local Ray token (~/.ray/auth_token,
    RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH) turns on token authentication for the Jobs API requests."""
    import logging

    try:
        from ray._private.authentication import authentication_token_setup as token_setup
    except ImportError:  # a Ray without token authentication
        return
    quiet = logging.getLogger(token_setup.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        token_setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)


def connect(address: str | None):
    """A JobSubmissionClient for the dashboard at `address` (http://HEAD:8265); None: RAY_ADDRESS."""
    from ray.job_submission import JobSubmissionClient

    _use_local_token()
    try:
        with _explicit_address(address):
            return JobSubmissionClient(address)
    except _api_errors() as err:
        where = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "<local>"
        raise SubmitError(f"cannot reach the Ray Jobs API at {where}: {_first_line(err)}") from err


def submit(client, spec: JobSpec, working_dir: Path, secrets: Mapping[str, str]) -> str:
    """Upload `working_dir` and start the job; returns its submission id."""
    try:
        return client.submit_job(entrypoint=spec.entrypoint, submission_id=spec.submission_id,
                                 runtime_env={**spec.runtime_env, "working_dir": str(working_dir)},
                                 metadata=spec.metadata)
    except (*_api_errors(), TypeError) as err:
        raise SubmitError(_redact(f"job submission failed: {_first_line(err)}", secrets.values())) from err


def job_info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except _api_errors() as err:
        raise SubmitError(f"job {job_id}: {_first_line(err)}") from err


def list_jobs(client) -> list:
    try:
        return sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    except _api_errors() as err:
        raise SubmitError(f"cannot list jobs: {_first_line(err)}") from err


def print_logs(client, job_id: str, out: TextIO, follow: bool = False) -> None:
    """The job's driver output so far, or (`follow`) streamed until the job ends."""
    job_info(client, job_id)  # an unknown id is one clear error, not a websocket failure
    if not follow:
        out.write(client.get_job_logs(job_id))
        return

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())


def wait_until_done(client, job_id: str, timeout_s: float = 60.0):
    """The job's final JobInfo; the log stream can close a moment before the status turns terminal."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = job_info(client, job_id)
        if str(info.status) in TERMINAL or time.monotonic() > deadline:
            return info
        time.sleep(1.0)


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def _redact(text: str, values) -> str:
    for value in values:
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def cluster_warnings(store: str | None, tracking_uri: str | None) -> list[str]:
    """What will not work as expected once the run is on a cluster (None: set neither in the YAML nor
    in this environment, so the job takes the nodes' VITPIPE_STORE / MLFLOW_TRACKING_URI, if any)."""
    notes = []
    if store is None:
        notes.append("no store set (YAML `store:` or VITPIPE_STORE): the job uses the nodes' VITPIPE_STORE "
                     "(ray_cluster.yaml sets it), else a folder on the node that runs the job")
    elif not is_s3(store):
        notes.append(f"store {store} is a path on the cluster's nodes: use an s3:// store (or a filesystem "
                     "shared by every node) so that stages on different nodes see each other's outputs")
    if tracking_uri is None:
        notes.append("no MLflow server set (YAML `tracking_uri:` or MLFLOW_TRACKING_URI): the job uses the "
                     "nodes' MLFLOW_TRACKING_URI (ray_cluster.yaml sets it), else a SQLite file on the head")
    elif tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri:
        notes.append(f"tracking URI {tracking_uri} is a file on the node that runs the job: set tracking_uri "
                     "to your MLflow server to see the runs")
    return notes
