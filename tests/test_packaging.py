"""vitpipe installs as one namespace, `vitpipe.<package>`, over the repository's top-level folders."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = ("cluster", "models", "pipelines", "tasks")


def test_every_package_folder_is_installed_under_the_vitpipe_namespace() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert settings["package-dir"] == {"vitpipe": "."}
    folders = {".".join(("vitpipe", *p.parent.relative_to(ROOT).parts))
               for top in TOP for p in (ROOT / top).rglob("__init__.py") if "__pycache__" not in p.parts}
    assert set(settings["packages"]) == folders  # a new package folder must be listed in pyproject.toml


def test_no_module_imports_a_bare_top_level_name() -> None:
    """`from models...` would import a user's `models` package (or a second copy of vitpipe's)."""
    statement = re.compile(rf"\s*(from|import) ({'|'.join(TOP)})[. ]")
    bare = [f"{path.relative_to(ROOT)}:{n}" for top in (*TOP, "tests", "benchmarks")
            for path in (ROOT / top).rglob("*.py")
            for n, line in enumerate(path.read_text().splitlines(), 1) if statement.match(line)]
    assert bare == []
