"""The Ray settings a driver takes to a cluster it joins (end to end on a `ray start` head:
tests/pipelines/test_submit.py; a local Ray inherits them: tests/tasks/test_data.py)."""

from __future__ import annotations

import pytest

from vitpipe.cluster.ray_connect import RAY_DATA_ENV, cluster_runtime_env


def test_a_cluster_gets_the_ray_data_settings_its_job_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in RAY_DATA_ENV:
        monkeypatch.delenv(name, raising=False)
    assert cluster_runtime_env() == {"env_vars": RAY_DATA_ENV}
    for name in RAY_DATA_ENV:  # set by the job's runtime_env (or the user): Ray refuses a key given twice
        monkeypatch.setenv(name, "4")
    assert cluster_runtime_env() is None
