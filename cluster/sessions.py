"""Where the one training loop runs: in Ray Train workers, or in the calling process.

The loop (cluster/train.py) asks its session for four things: its rank, the checkpoint to resume from,
where to report a new one, and its shard of a Ray Dataset.

- `RayTrainSession`: a Ray Train worker. Ray Train starts a controller and the workers, forms the process
  group, restarts failed workers and keeps checkpoints under `<storage>/<name>/`. Every multi-worker job runs
  here, and any job whose resources say `launcher: ray_train`.
- `LocalSession`: the calling process, for a one-worker job (a node's own Ray task, with the worker's
  resources reserved for that task). Nothing is started per job: imports, the one-rank process group and the
  DeepSpeed op stay warm in a reused Ray worker process, so a fan-out of small nodes does not pay Ray Train's
  start-up per node (docs/decisions.md). Checkpoints are the same files with the same digests, kept under
  `<storage>/<name>/checkpoint_<step>/` (local or S3, the newest two), and are verified before use exactly as
  Ray Train's are.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import pyarrow.fs as pafs
import torch

from vitpipe.cluster.fs import arrow_filesystem, is_s3

log = logging.getLogger("vitpipe.train")


class Session(Protocol):
    rank: int
    world: int
    local_rank: int

    def restore(self) -> Any:
        """Context manager: a local folder holding the checkpoint to resume from, or None."""

    def report(self, metrics: dict[str, float], directory: str) -> None:
        """Keep `directory` (this rank's files of the checkpoint at metrics["step"]) and report metrics."""

    def dataset_shard(self, name: str) -> Any:
        """This rank's part of the job's Ray Dataset `name` (anything with `iter_torch_batches`)."""


class RayTrainSession:
    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world, self.local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()

    @contextmanager
    def restore(self) -> Iterator[str | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield d

    def report(self, metrics: dict[str, float], directory: str) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def dataset_shard(self, name: str) -> Any:
        import ray.train

        return ray.train.get_dataset_shard(name)


CHECKPOINT = re.compile(r"checkpoint_(\d{6,})")


class LocalSession:
    """Rank 0 of 1 in this process; checkpoints in `<storage_path>/<name>/checkpoint_<step>/`."""

    rank, world, local_rank = 0, 1, 0

    def __init__(self, storage_path: str, name: str, datasets: dict[str, Any], keep: int = 2) -> None:
        self.fs, root = arrow_filesystem(storage_path)
        self.run = f"{root}/{name}"
        self.label = f"{storage_path.rstrip('/')}/{name}"
        self.s3 = is_s3(storage_path)
        self.datasets, self.keep = datasets, keep

    def checkpoints(self) -> list[tuple[int, str]]:
        """(step, path) of the run's checkpoints, oldest first."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.run, allow_not_found=True))
        found = [(int(m[1]), i.path) for i in infos
                 if i.type == pafs.FileType.Directory and (m := CHECKPOINT.fullmatch(i.base_name))]
        return sorted(found)

    @contextmanager
    def restore(self) -> Iterator[str | None]:
        """The newest checkpoint (Ray Train's rule: a damaged newest one means training from scratch)."""
        found = self.checkpoints()
        if not found:
            yield None
            return
        path = found[-1][1]
        if not self.s3:
            yield path
            return
        with tempfile.TemporaryDirectory(prefix="vitpipe-restore-") as d:
            pafs.copy_files(path, d, source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
            yield d

    def report(self, metrics: dict[str, float], directory: str) -> None:
        target = f"{self.run}/checkpoint_{int(metrics['step']):06d}"
        if self.s3:  # the digests name every file: a partly uploaded checkpoint never verifies
            pafs.copy_files(directory, target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        else:  # complete or absent: copied beside its final name, then renamed into place
            os.makedirs(self.run, exist_ok=True)
            partial = tempfile.mkdtemp(prefix=".partial-", dir=self.run)
            shutil.copytree(directory, partial, dirs_exist_ok=True)
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(partial, target)
        for _, old in self.checkpoints()[:-self.keep]:
            self.fs.delete_dir(old)

    def dataset_shard(self, name: str) -> Any:
        return self.datasets[name]


@contextmanager
def one_rank_world() -> Iterator[None]:
    """What a launcher provides to rank 0 of a one-process job: a process group and DeepSpeed's LOCAL_RANK.

    The group is made once per process and kept: DeepSpeed caches the groups it sees for the process's life,
    so a destroyed and re-made group breaks the next engine. LOCAL_RANK (DeepSpeed reads only the
    environment) is set for the job's duration and restored after.
    """
    dist = torch.distributed
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise RuntimeError(f"a one-worker job runs in a process that is rank {dist.get_rank()} of "
                           f"{dist.get_world_size()}: run it from outside that process group")
    before = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LOCAL_RANK", None)
        else:
            os.environ["LOCAL_RANK"] = before
