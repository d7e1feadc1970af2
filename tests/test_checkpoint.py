"""Checkpoint publishing, pruning and discovery with a stand-in engine on one process.

The DeepSpeed side (a real ZeRO-3 engine saved and resumed by 2 ranks) is covered in test_train.py;
a real full disk and real debris of killed writes in test_faults.py.
"""

import errno
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tail_kd import checkpoint as checkpoint_module
from tail_kd.checkpoint import CheckpointManager, CheckpointWriteError, capture_rng, restore_rng
from tail_kd.exit_status import UsageError
from tail_kd.run_dir import complete_checkpoints, find_checkpoint


class FakeEngine:
    """Writes and reads one file under `<dir>/<tag>/`, as DeepSpeed's engine does (many)."""

    def __init__(self, value: int = 0, disk_full: bool = False):
        self.value = value
        self.disk_full = disk_full

    def save_checkpoint(self, save_dir: str, tag: str) -> None:
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps({"value": self.value}))
        if self.disk_full:
            raise OSError(errno.ENOSPC, "No space left on device")

    def load_checkpoint(self, load_dir: str, tag: str):
        self.value = json.loads((Path(load_dir) / tag / "state.json").read_text())["value"]
        return load_dir, {}


def single_process(world_size: int = 1) -> SimpleNamespace:
    """The DistContext of rank 0 alone: collectives are identities."""
    return SimpleNamespace(
        rank=0, world_size=world_size, is_main=True, barrier=lambda: None, broadcast=lambda x: x
    )


def save(manager: CheckpointManager, step: int) -> None:
    manager.save(FakeEngine(step), step, {"world_size": 1}, {"loader": {"position": step}})


def test_save_publishes_complete_checkpoint_and_load_restores_it(tmp_path):
    manager = CheckpointManager(tmp_path, single_process(), keep=2)
    save(manager, 10)
    (checkpoint,) = complete_checkpoints(tmp_path)
    assert checkpoint.step == 10 and checkpoint.path.name == "step-0000010"
    assert (checkpoint.path / "COMPLETE").is_file()
    assert not list((tmp_path / "checkpoints").glob("tmp-*"))
    engine = FakeEngine()
    trainer_state, rank_state = manager.load(engine, manager.latest())
    assert engine.value == 10
    assert trainer_state["step"] == 10 and rank_state == {"loader": {"position": 10}}


def test_keep_prunes_oldest_only_after_the_new_one_is_complete(tmp_path):
    manager = CheckpointManager(tmp_path, single_process(), keep=2)
    for step in (1, 2, 3):
        save(manager, step)
    assert [c.step for c in complete_checkpoints(tmp_path)] == [2, 3]


def test_interrupted_writes_are_ignored_then_cleaned_up(tmp_path):
    manager = CheckpointManager(tmp_path, single_process(), keep=3)
    save(manager, 5)
    # A run killed while writing step 6 (temporary folder) or before marking step 7 COMPLETE.
    (tmp_path / "checkpoints" / "tmp-step-0000006" / "deepspeed").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-0000007" / "deepspeed").mkdir(parents=True)
    assert manager.latest().step == 5
    assert find_checkpoint(tmp_path).step == 5
    save(manager, 8)  # the resumed run's next checkpoint removes the debris
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-0000005", "step-0000008"]


def test_find_checkpoint_by_step_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no complete checkpoint"):
        find_checkpoint(tmp_path)
    manager = CheckpointManager(tmp_path, single_process(), keep=2)
    save(manager, 3)
    save(manager, 4)
    assert find_checkpoint(tmp_path, step=3).step == 3
    with pytest.raises(FileNotFoundError, match=r"complete steps: 3, 4"):
        find_checkpoint(tmp_path, step=9)


def test_resuming_with_another_world_size_is_refused(tmp_path):
    save(CheckpointManager(tmp_path, single_process(), keep=1), 1)
    manager = CheckpointManager(tmp_path, single_process(world_size=2), keep=1)
    with pytest.raises(UsageError, match="written by 1 ranks but this job has 2"):
        manager.load(FakeEngine(), manager.latest())


def test_rng_states_round_trip_through_json():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = json.loads(json.dumps(capture_rng()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.mark.parametrize("where", ["engine", "trainer_state", "publish"])
def test_write_errors_name_the_folder_and_keep_the_previous_checkpoint(
    tmp_path, monkeypatch, where
):
    manager = CheckpointManager(tmp_path, single_process(), keep=2)
    save(manager, 1)
    engine = FakeEngine(2, disk_full=where == "engine")
    real_write = checkpoint_module._write_json

    def failing_write(path, obj):
        if (where == "trainer_state" and path.name == "trainer_state.json") or (
            where == "publish" and path.name == "COMPLETE"
        ):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, obj)

    monkeypatch.setattr(checkpoint_module, "_write_json", failing_write)
    with pytest.raises(CheckpointWriteError) as error:
        manager.save(engine, 2, {"world_size": 1}, {})
    message = str(error.value)
    folder = "step-0000002" if where == "publish" else "tmp-step-0000002"
    assert f"could not write checkpoint {tmp_path / 'checkpoints' / folder}" in message
    assert "No space left on device" in message and "disk full" in message
    assert f"the newest complete checkpoint, {tmp_path / 'checkpoints' / 'step-0000001'}" in message
    assert "rerun with --resume" in message
    # Nothing half-written is left; the previous checkpoint is still the newest and loads.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000001"]
    loaded = FakeEngine()
    manager.load(loaded, manager.latest())
    assert loaded.value == 1
