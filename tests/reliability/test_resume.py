"""Re-running a finished training run whose newest checkpoint was damaged, truncated or planted: the run
must train again from scratch (never return or unpickle the bad state) and say which file was wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny_recipe import digits_tensors, mlp, mlp_accuracy, mlp_loss
from vitpipe.cluster.batches import TensorBatches
from vitpipe.cluster.checkpoints import CheckpointError
from vitpipe.cluster.config import Resources, TrainConfig
from vitpipe.cluster.train import Recipe, TrainJob, _read_result, fit

pytestmark = pytest.mark.reliability

NAME = "stage-key"  # a stage's Ray Train run is named after its key: every re-run finds the same folder


class _LoggedSteps:
    """on_log (rank 0): appends each logged step to a file, so the test sees which steps were trained."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, step: int, steps: int, metrics: dict[str, float]) -> None:
        if "loss" not in metrics:  # an evaluation (eval/<name>), not a training step
            return
        with self.path.open("a") as f:
            f.write(f"{step}\n")


def _job(storage: Path, logged: Path, launcher: str) -> TrainJob:
    cfg = TrainConfig(steps=4, batch_size=32, lr=1e-2, warmup_steps=1, checkpoint_every=2, log_every=2,
                      max_failures=0)
    recipe = Recipe(mlp, TensorBatches(digits_tensors), mlp_loss, evaluate=mlp_accuracy, select_metric="accuracy")
    return TrainJob(NAME, recipe, cfg, Resources(num_workers=1, launcher=launcher), str(storage), seed=3,
                    on_log=_LoggedSteps(logged))


@pytest.fixture(scope="module", params=["auto", "ray_train"])
def finished(request, ray_local, tmp_path_factory: pytest.TempPathFactory):
    """One complete run (in this process, or through Ray Train), its run folder kept as the pristine copy
    each test damages."""
    tmp = tmp_path_factory.mktemp("finished")
    return tmp / "ray", fit(_job(tmp / "ray", tmp / "logged", request.param)), request.param


def _newest_checkpoint(storage: Path) -> Path:
    return max(p for p in (storage / NAME).glob("checkpoint_*") if p.is_dir())  # named by step, or by time


@pytest.fixture
def rerun(finished, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """(newest checkpoint of a copy of the finished run, re-run it -> (result, logged steps), warnings)."""
    storage = tmp_path / "ray"
    shutil.copytree(finished[0] / NAME, storage / NAME)
    newest = _newest_checkpoint(storage)

    def again():
        logged = tmp_path / "logged"
        result = fit(_job(storage, logged, finished[2]))
        return result, logged.read_text().split() if logged.exists() else []

    def warnings() -> list[str]:
        """Lines about the newest checkpoint: this process's log, or the Ray Train worker logs of this session."""
        if finished[2] == "auto":
            lines = [r.getMessage() for r in caplog.records]
        else:
            import ray

            logs = Path(ray._private.worker._global_node.get_session_dir_path(), "logs", "train")
            lines = [line for f in logs.glob("ray-train-app-worker-*.log")
                     for line in f.read_text(errors="replace").splitlines()]
        return [line for line in lines if str(newest) in line]

    return newest, again, warnings


def _assert_trained_from_scratch(result, logged: list[str], finished) -> None:
    assert logged == ["2", "4"], "the re-run did not train every step again"
    reference = finished[1]
    assert [h["step"] for h in result.history] == [1, 2, 3, 4]
    for name, value in reference.state.items():
        assert value.abs().sum() > 0 and torch.allclose(result.state[name], value, atol=1e-5), name


def test_an_intact_checkpoint_is_restored_not_retrained(rerun, finished) -> None:
    """The control that keeps the tests below honest: verification does not reject a good checkpoint."""
    newest, again, warnings = rerun
    result, logged = again()
    assert logged == [] and not warnings()
    for name, value in finished[1].state.items():
        assert torch.equal(result.state[name], value), name


def test_zeroed_best_weights_are_not_resumed_but_retrained(rerun, finished) -> None:
    newest, again, warnings = rerun
    best = newest / "best.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(str(best)).items()}, str(best))
    result, logged = again()
    _assert_trained_from_scratch(result, logged, finished)
    warned = warnings()
    assert len(warned) == 1 and "best.safetensors: sha256" in warned[0] and "from scratch" in warned[0], warned


class _Planted:
    """Unpickling this writes a marker file: what a planted checkpoint could do in a training worker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('unpickled')",)


def test_a_planted_pickle_is_never_unpickled(rerun, finished, tmp_path: Path) -> None:
    newest, again, warnings = rerun
    marker = tmp_path / "unpickled"
    torch.save(_Planted(marker), newest / "step" / "mp_rank_00_model_states.pt")
    try:
        result, logged = again()
    finally:  # checked first: a worker that unpickled it may also have failed
        assert not marker.exists(), "DeepSpeed unpickled the planted checkpoint"
    _assert_trained_from_scratch(result, logged, finished)
    assert any("mp_rank_00_model_states.pt" in line for line in warnings())


def test_a_truncated_checkpoint_is_ignored(rerun, finished) -> None:
    newest, again, warnings = rerun
    states = newest / "step" / "mp_rank_00_model_states.pt"  # what a full disk leaves behind
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    result, logged = again()
    _assert_trained_from_scratch(result, logged, finished)
    assert any("mp_rank_00_model_states.pt" in line and "bytes" in line for line in warnings())


def test_fit_verifies_the_final_checkpoint_before_reading_it(finished, tmp_path: Path) -> None:
    final = tmp_path / "final"
    shutil.copytree(_newest_checkpoint(finished[0]), final)
    summary, state = _read_result(str(final), "final")
    assert summary["step"] == 4 and state.keys() == finished[1].state.keys()
    (final / "result.json").write_text('{"step": 4, "history": [], "best": null}')
    with pytest.raises(CheckpointError, match="final checkpoint .*result.json: "):
        _read_result(str(final), "final")
