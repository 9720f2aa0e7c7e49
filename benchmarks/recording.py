"""Appending one benchmark run to BENCHMARKS.md: a heading (script, date, machine, setting), the command, and
the figures, as bullets or as table rows."""

from __future__ import annotations

import sys
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
