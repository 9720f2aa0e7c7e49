"""Where a pipeline's Ray is: join a cluster or start a local one (loopback only), route Ray's own messages,
and place the progress actor."""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

import ray

from vitpipe.cluster.progress import ProgressBoard

# Ray Train settings for a Ray this process starts on its own machine (the environment still decides: setdefault).
# The controller polls its workers every 2 s by default and a stage waits several polls (start, every report,
# finish): locally, where stages are short, poll every 0.2 s. A local node is never preempted, so no preemption
# watcher (a Ray actor per fit, ~2 CPU-s to start) polls its drain state. A cluster's raylets keep their own.
LOCAL_RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


# Ray Data settings for every Ray vitpipe uses (docs/decisions.md). A pass over Parquet files starts by reading
# their footers in a pool of actors that it starts and kills, 32 by default (Ray 2.60): ~1.5 CPU-s each to start,
# ~48 CPU-s per epoch or `take` for a stage's few shards. One actor reads footers on 128 IO threads, enough for
# thousands of shard files.
RAY_DATA_ENV = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}


def local_ray_env() -> None:
    """Settings for a Ray this process starts: its processes inherit this environment (set values win)."""
    for name, value in {**LOCAL_RAY_TRAIN_ENV, **RAY_DATA_ENV}.items():
        os.environ.setdefault(name, value)


def cluster_runtime_env() -> dict[str, Any] | None:
    """The job runtime_env that takes RAY_DATA_ENV to a cluster's workers, for the settings this driver's
    environment lacks (a job submitted with one of them has it here too; Ray refuses a key set twice)."""
    missing = {name: value for name, value in RAY_DATA_ENV.items() if name not in os.environ}
    return {"env_vars": missing} if missing else None


def connect_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Connect to `address` / RAY_ADDRESS, else start a local Ray of `num_cpus` / `num_gpus`, quietly."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    if address:
        ray.init(address=address, runtime_env=cluster_runtime_env(), **quiet)
    else:
        local_ray_env()
        loopback_only()
        # address="local": always a new Ray of our own; plain ray.init() would join whatever cluster this
        # machine runs (another user's `ray start`, a test cluster) through Ray's current-cluster file.
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 **quiet)
    route_ray_messages(sys.stderr)


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_only() -> None:
    """A local Ray serves this process only: every Ray server (GCS, raylet, workers, agents) listens on
    127.0.0.1, not on all interfaces (unauthenticated gRPC reachable from the network). Ray's own switch for
    that is the one it uses on macOS and Windows; its processes read it from the environment, this driver from
    ray_constants (already imported). Set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 to opt out. docs/decisions.md."""
    import ray._private.ray_constants as ray_constants

    os.environ.setdefault(LOOPBACK_ENV, "0")
    ray_constants.ENABLE_RAY_CLUSTER = os.environ[LOOPBACK_ENV].lower() in ("1", "true")


NODE_LOST = re.compile(r"node\b.*\b(dead|died|lost|removed|failed)\b|\b(dead|lost|removed)\b.*\bnode\b", re.I)


def route_ray_messages(out: TextIO) -> None:
    """Ray prints the raylet's and GCS's messages (worker-pool warnings, a lost node's ~40-line state dump)
    straight onto the driver's stdout whatever log_to_driver says. Keep them in Ray's log folder
    (vitpipe-ray-messages.log) and say one line where they report a lost node."""
    import ray._private.worker as ray_worker

    node = ray_worker._global_node
    folder = Path(node.get_logs_dir_path()) if node is not None else Path(tempfile.gettempdir())
    path = folder / "vitpipe-ray-messages.log"
    original = getattr(ray_worker.print_to_stdstream, "vitpipe_original", ray_worker.print_to_stdstream)

    def route(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            return original(data, ignore_prefix)
        text = "\n".join(data.get("lines", []))
        with open(path, "a") as f:
            f.write(text.rstrip() + "\n")
        first = text.strip().splitlines()[0] if text.strip() else ""
        if NODE_LOST.search(first):
            print(f"vitpipe: Ray reports a lost node: {first[:200]} (Ray's message: {path})", file=out)
        return None

    route.vitpipe_original = original  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = route


def progress_board() -> Any:
    """The progress actor, on the driver's node (not on a worker node that may be lost)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ProgressBoard.options(scheduling_strategy=here).remote()
