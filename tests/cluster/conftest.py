"""A `store` fixture that runs each store test against a local directory and against S3 (moto)."""

from __future__ import annotations

import pytest

from vitpipe.cluster.store import ArtifactStore, LocalStore, open_store


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(str(tmp_path / "artifacts"))
    return open_store(request.getfixturevalue("s3_bucket"))
