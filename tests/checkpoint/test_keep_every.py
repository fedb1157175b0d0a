"""checkpoint.keep_every on real folders: pruning keeps the newest keep_last and every Nth step,
and deletes only what neither keeps (no training; the trainer's use in tests/training)."""

from pathlib import Path

from dense_model.checkpoint import layout
from dense_model.config import Config


def _fake_checkpoint(folder: Path, iteration: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "common.pt").write_bytes(b"common")
    layout.write_metadata(folder, iteration, Config())
    return folder


def _publish(root: Path, iteration: int, keep_last, keep_every) -> None:
    tmp = _fake_checkpoint(root / f"iter_{iteration:07d}.tmp", iteration)
    layout.publish(tmp, layout.iteration_dir(root, iteration), root, iteration, keep_last, keep_every)


def _kept(root: Path) -> list[int]:
    return sorted(int(p.name[len("iter_") :]) for p in root.glob("iter_*"))


def test_keep_every_with_keep_last_prunes_only_what_neither_keeps(tmp_path):
    root = tmp_path / "checkpoints"
    for step in range(2, 32, 2):  # saves every 2 steps: 2, 4, ..., 30
        _publish(root, step, keep_last=2, keep_every=8)
    # keep_last=2: 28 and 30; keep_every=8: 8, 16, 24; everything else is gone.
    assert _kept(root) == [8, 16, 24, 28, 30]
    assert all((layout.iteration_dir(root, s) / "common.pt").read_bytes() == b"common" for s in _kept(root))
    assert not (root / layout.STALE).exists()  # pruned, never moved aside


def test_without_keep_every_keep_last_alone_decides(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (5, 10, 15, 20):
        _publish(root, step, keep_last=2, keep_every=None)
    assert _kept(root) == [15, 20]
    root2 = tmp_path / "all"
    for step in (5, 10, 15, 20):
        _publish(root2, step, keep_last=None, keep_every=10)  # keep_last None keeps all
    assert _kept(root2) == [5, 10, 15, 20]


def test_keep_every_must_be_positive():
    import pytest

    from dense_model.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="checkpoint.keep_every must be a finite number > 0"):
        load_config(None, ["checkpoint.keep_every=0"]).checkpoint.validate()
