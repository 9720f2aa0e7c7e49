"""The command line: bad input gives one line on stderr and exit code 2; nothing written is lost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vitpipe.pipelines.cli import main


def vitpipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitpipe.pipelines.cli", *args], capture_output=True, text=True,
                          timeout=300)


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("vitpipe: error: ")
    return lines[0]


def test_bad_yaml_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: {faces: {source: faces}\n  oops: [\n")
    done = vitpipe("plan", str(bad))
    assert done.returncode == 2
    assert "bad.yaml: line" in one_error_line(done.stderr)


def test_unknown_method_names_its_path(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--set", "stages.finetune.methods=[linear, lora2]"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "stages.finetune.methods[1]: unknown fine-tuning method 'lora2'" in line


def test_undecodable_image_names_the_file_and_keeps_existing_shards(tmp_path: Path) -> None:
    tree = tmp_path / "images"
    for cls in ("cats", "dogs"):
        (tree / cls).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tree / cls / f"{i}.png")
    out = tmp_path / "shards"
    assert main(["data", "prepare", "--source", f"imagefolder:{tree}", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    assert before

    (tree / "dogs" / "broken.png").write_bytes(b"\x89PNG not really an image")
    done = vitpipe("data", "prepare", "--source", f"imagefolder:{tree}", "--out", str(out))
    assert done.returncode == 2
    assert "broken.png" in one_error_line(done.stderr)
    assert {p.name: p.read_bytes() for p in out.glob("*.parquet")} == before
