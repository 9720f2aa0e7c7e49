"""`make test`: the suite as three pytest processes at once, each with its own local Ray, MLflow server and S3
server (every port is a free one; `ray_local` starts its own Ray).

One pytest process at a time left one of the CI machine's two cores idle (Ray, MLflow and moto servers starting,
subprocess CLIs, lease and checkpoint timeouts); with three shards side by side both cores are busy from start to
end, so the run takes about the suite's CPU time over two. Each line is printed as it comes, prefixed with its
shard; the exit code is the first non-zero one (pytest's 5, no tests collected, included).

    python tests/parallel.py [PYTEST_ARGS ...]   # all shards
    python -m pytest [PYTEST_ARGS ...] PATHS     # one process, e.g. a folder or a test (no sharding)

Arguments that name test paths run those in one process instead of sharding.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The shards by folder, the last one is everything else (a new test folder lands there); balanced by the
# per-folder times measured on the 2-core machine (BENCHMARKS.md, "Test suite").
SHARDS = (("tests/pipelines",), ("tests/reliability", "tests/test_packaging.py", "tests/test_ray_cluster_yaml.py"))


def shard_commands(args: list[str]) -> list[list[str]]:
    pytest = [sys.executable, "-m", "pytest"]
    if any((ROOT / a.split("::")[0]).exists() for a in args if not a.startswith("-")):
        return [pytest + args]
    named = [p for shard in SHARDS for p in shard]
    return [pytest + args + list(s) for s in SHARDS] + [pytest + args + ["tests"] + [f"--ignore={p}" for p in named]]


def main(args: list[str]) -> int:
    commands = shard_commands(args)
    started = time.monotonic()
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}) for cmd in commands]
    lock = threading.Lock()

    def relay(i: int, proc: subprocess.Popen) -> None:
        prefix = f"[{i + 1}/{len(procs)}] " if len(procs) > 1 else ""
        for line in proc.stdout:
            with lock:
                sys.stdout.write(prefix + line)
                sys.stdout.flush()

    threads = [threading.Thread(target=relay, args=(i, p)) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    codes = [p.wait() for p in procs]
    for t in threads:
        t.join()
    took = time.monotonic() - started
    names = [" ".join(s) for s in SHARDS] + ["the rest of tests/"] if len(procs) > 1 else [" ".join(args)]
    for i, (name, code) in enumerate(zip(names, codes, strict=True)):
        print(f"shard {i + 1} ({name}): exit code {code}")
    print(f"{len(procs)} pytest process(es) in {took:.0f} s")
    return next((c for c in codes if c != 0), 0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
