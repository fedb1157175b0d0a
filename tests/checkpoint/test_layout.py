"""The checkpoint layout on real folders (no training): fsync_tree reaches every file and folder,
publish makes a checkpoint durable before the tracker moves and prunes only below the tracker,
plan_load decides what a job loads. (The same through run_pretrain.sh:
tests/training/test_checkpoint_load.py.)"""

import os
from pathlib import Path

import pytest

from dense_model.checkpoint import layout
from dense_model.config import Config


@pytest.fixture
def fsynced(monkeypatch):
    """Every path os.fsync is called on, in order (os.fsync itself still runs)."""
    calls = []
    real = os.fsync

    def recording(fd):
        calls.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return calls


def _fake_checkpoint(folder: Path, iteration: int) -> Path:
    """A folder shaped like a saved checkpoint: files at two depths and dense_model.json."""
    (folder / "rng_state").mkdir(parents=True)
    (folder / "common.pt").write_bytes(b"common")
    (folder / "__0_0.distcp").write_bytes(b"tensors")
    (folder / "rng_state/shard_0.pt").write_bytes(b"rng")
    layout.write_metadata(folder, iteration, Config())
    return folder


def test_fsync_tree_fsyncs_every_file_and_folder(tmp_path, fsynced):
    root = _fake_checkpoint(tmp_path / "iter_0000004", 4)
    (root / "empty_dir").mkdir()
    fsynced.clear()
    layout.fsync_tree(root)
    files = {p for p in root.rglob("*") if p.is_file()}
    dirs = {root, *(p for p in root.rglob("*") if p.is_dir())}
    assert set(fsynced) == files | dirs
    assert len(fsynced) == len(files | dirs)  # each once


def test_publish_makes_the_folder_durable_then_the_tracker_then_prunes_below_it(tmp_path, fsynced, capsys):
    root = tmp_path / "checkpoints"
    for it in (2, 3, 20, 30):  # 20 and 30: an older run's, above what this run publishes
        _fake_checkpoint(layout.iteration_dir(root, it), it)
    (root / layout.TRACKER).write_text("30")
    tmp = _fake_checkpoint(root / "iter_0000010.tmp", 10)
    files = {p for p in tmp.rglob("*") if p.is_file()}
    fsynced.clear()

    layout.publish(tmp, layout.iteration_dir(root, 10), root, 10, keep_last=2)

    assert layout.read_latest_iteration(root) == 10
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_0000003", "iter_0000010"]
    stale = sorted(p.name.split(".")[0] for p in (root / layout.STALE).iterdir())
    assert stale == ["iter_0000020", "iter_0000030"]  # moved aside, not deleted
    assert all((p / "common.pt").read_bytes() == b"common" for p in (root / layout.STALE).iterdir())
    out = capsys.readouterr().out
    assert out.count("checkpoint: moved ") == 2 and f"{root}/iter_0000030 aside to {root}/stale/" in out
    # Durability, in order (each fsync recorded under the name its file had then): every file of
    # the checkpoint, before the tracker's new content; the folder holding the renamed checkpoint,
    # before the tracker too; the tracker's folder after its rename; the moves aside after all that.
    tracker_at = fsynced.index(root / (layout.TRACKER + ".tmp"))
    assert files <= set(fsynced[:tracker_at])
    assert root in fsynced[:tracker_at] and root in fsynced[tracker_at:]
    assert root / layout.STALE in fsynced[tracker_at:] and root / layout.STALE not in fsynced[:tracker_at]


def test_publish_over_an_existing_folder_of_the_same_iteration_moves_it_aside(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    old = _fake_checkpoint(layout.iteration_dir(root, 5), 5)
    (old / "common.pt").write_bytes(b"the older run's")
    tmp = _fake_checkpoint(root / "iter_0000005.tmp", 5)
    layout.publish(tmp, layout.iteration_dir(root, 5), root, 5, keep_last=1)
    assert (layout.iteration_dir(root, 5) / "common.pt").read_bytes() == b"common"
    (aside,) = (root / layout.STALE).iterdir()
    assert (aside / "common.pt").read_bytes() == b"the older run's"


def test_plan_load(tmp_path):
    src = tmp_path / "src/checkpoints"
    _fake_checkpoint(layout.iteration_dir(src, 8), 8)
    (src / layout.TRACKER).write_text("8")
    run = tmp_path / "run"

    plan = layout.plan_load(run, None, "resume", fresh=False)
    assert plan.folder is None and plan.note is None
    for form in (tmp_path / "src", src, src / "iter_0000008"):  # the three documented forms
        plan = layout.plan_load(run, str(form), "resume", fresh=False)
        assert (plan.folder, plan.mode, plan.source, plan.iteration) == (
            src / "iter_0000008",
            "resume",
            "load",
            8,
        )
    assert layout.plan_load(run, str(src), "weights", fresh=False).mode == "weights"
    with pytest.raises(
        layout.CheckpointError, match=r"checkpoint.load=.*/nowhere does not exist; give a run"
    ):
        layout.plan_load(run, str(tmp_path / "nowhere"), "resume", fresh=False)

    # The run's own checkpoint wins over checkpoint.load, with a note; fresh=true ignores it.
    own = run / "checkpoints"
    _fake_checkpoint(layout.iteration_dir(own, 3), 3)
    (own / layout.TRACKER).write_text("3")
    plan = layout.plan_load(run, str(src), "weights", fresh=False)
    assert (plan.folder, plan.mode, plan.source) == (own / "iter_0000003", "resume", "own")
    assert f"checkpoint.load={src} is not used" in plan.note
    plan = layout.plan_load(run, str(src), "resume", fresh=True)
    assert (plan.folder, plan.source) == (src / "iter_0000008", "load")
    assert plan.note.startswith(f"checkpoint.fresh=true: not resuming {own} (tracker at step 3)")

    # A weights-only checkpoint loads as weights whatever load_mode says.
    imported = tmp_path / "imported"
    imported.mkdir()
    layout.write_metadata(imported, 0, Config(), weights_only=True)
    assert layout.read_metadata(imported)["weights_only"] is True
    plan = layout.plan_load(tmp_path / "other", str(imported), "resume", fresh=False)
    assert (plan.folder, plan.mode, plan.iteration) == (imported, "weights", 0)
