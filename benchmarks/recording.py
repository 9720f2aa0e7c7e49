"""A benchmark run's frame: its command line (with --record), the load average and clock at its start, and its
report, printed and, with --record, appended to BENCHMARKS.md (a heading with script, date, machine and setting,
the command, and the figures as bullets or table rows)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def record(setting: str, lines: list[str], note: str | None = None, table: bool = False) -> None:
    """`setting`: the machine and what was run, after the heading's script and date; `note`: a line under the
    heading (the command line is prepended); `table`: `lines` are markdown table rows, not bullets."""
    script = Path(sys.argv[0]).name
    command = f"`python benchmarks/{script} {' '.join(sys.argv[1:])}`".replace(" `", "`")
    with open(BENCHMARKS, "a") as f:
        f.write(f"\n### {script}, {date.today()}, {setting}\n\n")
        f.write(f"{command}{': ' + note if note else ''}\n\n")
        f.write("".join(f"{'' if table else '- '}{line}\n" for line in lines))


def interleaved_args(parser: argparse.ArgumentParser, batch: int, warmup: int, rounds: int, unit: str) -> None:
    """The options of a benchmark that times configurations in interleaved rounds."""
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed {unit}")
    parser.add_argument("--rounds", type=int, default=rounds, help=f"timed {unit}")


class Bench:
    """Parses the command line (adding --record), sets torch's thread count, and notes the load average and
    the clock at the start."""

    def __init__(self, parser: argparse.ArgumentParser, threads: int) -> None:
        import torch

        parser.add_argument("--record", action="store_true", help="append the figures to BENCHMARKS.md")
        self.args = parser.parse_args()
        torch.set_num_threads(threads)
        self.load, self.started = os.getloadavg()[0], time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def report(self, lines: list[str], threads: str, done: str, note: str | None = None, table: bool = False) -> None:
        """Print the figures and `done` (what ran; the elapsed time is added); with --record, append them."""
        elapsed = self.elapsed
        print("\n".join(lines))
        print(f"{done}, {elapsed:.0f} s")
        if self.args.record:
            machine = f"{platform.machine()}, {os.cpu_count()} cores, {threads}, CPU"
            note = f"{note}, {elapsed:.0f} s" if note else f"{elapsed:.0f} s"
            record(f"{machine}, load average {self.load:.1f} at start", lines, note=note, table=table)
