"""Console progress: training workers post (step, loss, images/s) to a Ray actor; the driver draws it.

One bar per running node. On a terminal the bars redraw in place; otherwise (CI, a log file) a line
is printed per node whenever it crosses another quarter of its steps.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import ray


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Latest training progress of every node, keyed by node name."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}

    def update(self, node: str, step: int, total: int, metrics: dict[str, float]) -> None:
        self.state[node] = {**self.state.get(node, {}), "step": step, "total": total, **metrics}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self.state


def bar(fraction: float, width: int = 20) -> str:
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "#" * filled + "-" * (width - filled)


def describe(node: str, p: dict[str, Any]) -> str:
    frac = p["step"] / max(1, p["total"])
    parts = [f"{node:<38} [{bar(frac)}] {p['step']:>5}/{p['total']:<5}"]
    if "loss" in p:
        parts.append(f"loss {p['loss']:.4f}")
    if "images_per_s" in p:
        parts.append(f"{p['images_per_s']:.0f} img/s")
    return "  ".join(parts)


class ConsoleProgress:
    """Draws the board for the nodes that are running now."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.tty = out.isatty()
        self.drawn = 0
        self.quarters: dict[str, int] = {}
        self.last = 0.0

    def draw(self, running: list[str], snapshot: dict[str, dict[str, Any]]) -> None:
        lines = [describe(n, snapshot[n]) for n in running if n in snapshot]
        if self.tty:
            if time.monotonic() - self.last < 0.2:
                return
            self.last = time.monotonic()
            self.clear()
            for line in lines:
                self.out.write(line[:160] + "\n")
            self.drawn = len(lines)
            self.out.flush()
            return
        for n in running:
            p = snapshot.get(n)
            if p is None:
                continue
            quarter = int(4 * p["step"] / max(1, p["total"]))
            if quarter > self.quarters.get(n, 0):
                self.quarters[n] = quarter
                self.out.write(describe(n, p) + "\n")
                self.out.flush()

    def clear(self) -> None:
        if self.tty and self.drawn:
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def print(self, line: str) -> None:
        """A permanent line (a node finished, failed or was cached), above the live bars."""
        self.clear()
        self.out.write(line + "\n")
        self.out.flush()
