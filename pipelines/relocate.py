"""`vitpipe relocate WORK_DIR`: make a moved or copied work folder's MLflow records point into it again.

MLflow stores absolute artifact locations (`file:///old/place/vitpipe-work/mlflow-artifacts/...`) in its
database, so after `mv vitpipe-work elsewhere` the UI shows "No Artifacts Recorded" and `models:/` URIs fail.
vitpipe's own records survive a move (manifests name files relative to the store; `vitpipe audit --store`
reads a moved store), so only the MLflow database needs rewriting. This works on the embedded layout
(`<work_dir>/mlflow.db` beside `<work_dir>/mlflow-artifacts` and `<work_dir>/artifacts`), in one SQLite
transaction: all of it is rewritten, or nothing.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

ARTIFACT_ROOT = "mlflow-artifacts"  # cluster.tracking.default_artifact_root: beside the database
# Every column of MLflow's schema that holds a location under the work folder, and the vitpipe tag that does.
COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"),
           ("model_versions", "source"), ("model_versions", "storage_location"), ("datasets", "dataset_source"))
STORE_TAG = "vitpipe.store"


class RelocateError(Exception):
    """The folder is not a vitpipe work folder with an embedded MLflow database."""


@dataclass(frozen=True)
class Relocation:
    old: tuple[str, ...]  # the work folders the records pointed into
    new: str
    rows: int  # rows rewritten


def recorded_work_dirs(db: sqlite3.Connection) -> set[str]:
    """The work folders the experiments' artifact roots were made in (parents of their mlflow-artifacts)."""
    found = set()
    for (location,) in db.execute("SELECT artifact_location FROM experiments"):
        url = urlparse(location or "")
        path = Path(unquote(url.path)) if url.scheme == "file" else Path(location or "")
        if path.name == ARTIFACT_ROOT and path.is_absolute():
            found.add(str(path.parent))
    return found


def relocate(work_dir: str | Path) -> Relocation:
    """Rewrite every location under the folder the records name to the same place under `work_dir`."""
    work = Path(work_dir).resolve()
    path = work / "mlflow.db"
    if not path.is_file():
        raise RelocateError(f"{work}: no mlflow.db here (relocate works on a work_dir with the embedded "
                            "SQLite MLflow database; a tracking server keeps its own artifact locations)")
    try:
        return _rewrite(path, work)
    except sqlite3.Error as err:
        raise RelocateError(f"{path}: {err} (nothing was changed)") from None


def _rewrite(path: Path, work: Path) -> Relocation:
    with sqlite3.connect(path) as db:  # one transaction: committed on success, rolled back on an error
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "experiments" not in tables:
            raise RelocateError(f"{path}: not an MLflow database (no experiments table)")
        old = sorted(recorded_work_dirs(db) - {str(work)})
        rows = 0
        for before in old:
            pairs = dict.fromkeys([(before, str(work)), (quote(before), quote(str(work)))])  # paths, file URIs
            for a, b in ((a + "/", b + "/") for a, b in pairs):
                for table, column in (c for c in COLUMNS if c[0] in tables):
                    rows += db.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?) "
                                       f"WHERE instr({column}, ?) > 0", (a, b, a)).rowcount
                rows += db.execute("UPDATE tags SET value = replace(value, ?, ?) "
                                   "WHERE key = ? AND instr(value, ?) = 1", (a, b, STORE_TAG, a)).rowcount
    return Relocation(tuple(old), str(work), rows)
