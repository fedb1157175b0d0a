"""dense_model.fsreplace, the one way a user-named folder is replaced: identity by device and inode
(symlinks, bind mounts, ``..``, trailing slashes), never someone else's run, a lock per target, a
crash at any step restored or finished by the next replacement, exact temporary names, the umask's
permissions. Pure file-system work: no torch, no worker processes beyond a forked child per kill."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest

import dense_model.fsreplace as fsreplace
from dense_model.fsreplace import ReplaceError, relation, replacing


def test_names_agree_with_the_checkpoint_and_run_lock_modules():
    from dense_model.checkpoint.layout import TRACKER
    from dense_model.training.run_lock import LOCK_NAME

    assert fsreplace.TRACKER == TRACKER and LOCK_NAME in fsreplace.PRECIOUS_FILES


@contextlib.contextmanager
def _bind_mount(source: Path, mountpoint: Path):
    """``mount --bind source mountpoint`` for the block, or None where this sandbox forbids it."""
    mountpoint.mkdir()
    done = subprocess.run(["mount", "--bind", str(source), str(mountpoint)], capture_output=True)
    try:
        yield mountpoint if done.returncode == 0 else None
    finally:
        if done.returncode == 0:
            subprocess.run(["umount", str(mountpoint)], check=True)


def test_relation_is_by_identity_through_symlinks_dots_slashes_and_bind_mounts(tmp_path):
    run = tmp_path / "data" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (tmp_path / "link").symlink_to(run)
    assert relation(tmp_path / "link", run) == "is"
    assert relation(f"{tmp_path}/link/", str(run)) == "is"  # trailing slash
    assert relation(tmp_path / "data" / ".." / "data" / "run", run) == "is"  # a/../a
    assert relation(tmp_path / "link" / "hf", run) == "lies inside"  # not there yet
    assert relation(tmp_path / "link" / "checkpoints", run) == "lies inside"
    assert relation(tmp_path / "data", tmp_path / "link") == "contains"
    assert relation(tmp_path / "elsewhere", run) is None
    # ``link/..`` is the link's folder by name, the run's parent physically (what a rename acts on)
    assert relation(tmp_path / "link" / "..", tmp_path / "data") == "is"
    with _bind_mount(tmp_path / "data", tmp_path / "mnt") as mnt:
        if mnt is None:
            pytest.skip("mount --bind is not allowed here (the symlink cases above ran)")
        assert relation(mnt / "run", run) == "is"
        assert relation(mnt / "run" / "hf", run) == "lies inside"
        assert relation(tmp_path, mnt / "run") == "contains"


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def _publish(target: Path, content: str, **kw) -> None:
    with replacing(target, what="test", overwrite=True, **kw) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights").write_text(content)


def test_replacement_refuses_runs_locks_and_claims_unless_they_are_its_own(tmp_path):
    runs = tmp_path / "runs"
    (runs / "x" / "checkpoints").mkdir(parents=True)
    (runs / "x" / "checkpoints" / fsreplace.TRACKER).write_text("100")
    before = _tree(tmp_path)
    for target in (runs / "x", runs, tmp_path / "runs/./x/"):
        with pytest.raises(ReplaceError, match=r"holds a checkpoint tracker \((x/)?checkpoints/latest_"):
            _publish(target, "new")
    assert _tree(tmp_path) == before
    (tmp_path / "work.shards").mkdir()
    (tmp_path / "work.shards" / "task.0.claim").write_text("{}")
    with pytest.raises(ReplaceError, match=r"holds a claim \(task\.0\.claim\)"):
        _publish(tmp_path / "work.shards", "new")
    _publish(runs / "x", "new", ours=lambda p: (p / "checkpoints").is_dir())  # its own kind: replaced
    assert _tree(runs / "x") == {"sub/weights": "new"}
    with pytest.raises(ReplaceError, match="exists and is not empty; remove it or pass --overwrite"):
        with replacing(runs / "x", what="test", overwrite=False):
            pass
    (tmp_path / "link").symlink_to(runs / "x")
    with pytest.raises(ReplaceError, match=r"is a symbolic link \(to .*runs/x\); name the folder itself"):
        _publish(tmp_path / "link", "new")
    assert _tree(runs / "x") == {"sub/weights": "new"}
    with pytest.raises(ReplaceError, match=r"output folder .*/runs contains HF_DIR .*x/sub"):
        _publish(runs, "new", apart=[(runs / "x" / "sub", "HF_DIR", ("is", "contains"))])


def test_one_replacement_per_target_and_a_dead_holders_lock_is_free(tmp_path):
    target = tmp_path / "out"
    with replacing(target, what="export", overwrite=True):
        with pytest.raises(
            ReplaceError, match=rf"out is being written by another export \(host .*, pid {os.getpid()},"
        ):
            _publish(target, "second")
    pid = os.fork()
    if pid == 0:  # a holder killed while it holds the lock
        try:
            with replacing(target, what="export", overwrite=True):
                os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    os.waitpid(pid, 0)
    _publish(target, "after")  # a dead holder's lock is taken over (its pid is gone on this host)
    assert _tree(target) == {"sub/weights": "after"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


STEPS = ["writing", "set aside", "renamed in", "deleting the old"]


def _killed_at(target: Path, step: str) -> None:
    """Replace ``target`` with "new" in a forked child that SIGKILLs itself at ``step``."""
    pid = os.fork()
    if pid != 0:
        os.waitpid(pid, 0)
        return
    try:
        renames = []
        rename, rmtree = os.rename, fsreplace.shutil.rmtree

        def renaming(src, dst):
            rename(src, dst)
            renames.append(dst)
            if (step, len(renames)) in (("set aside", 1), ("renamed in", 2)):
                os.kill(os.getpid(), signal.SIGKILL)

        def deleting(path, *a, **kw):
            if step == "deleting the old" and Path(path).name.endswith(".old"):
                os.remove(Path(path) / "sub" / "weights")  # half deleted
                os.kill(os.getpid(), signal.SIGKILL)
            rmtree(path, *a, **kw)

        fsreplace.os.rename, fsreplace.shutil.rmtree = renaming, deleting
        with replacing(target, what="test", overwrite=True) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "weights").write_text("new")
            if step == "writing":
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        os._exit(1)


@pytest.mark.parametrize("step", STEPS)
def test_a_replacement_killed_at_each_step_is_restored_or_finished_by_the_next(tmp_path, step):
    target = tmp_path / "out"
    _publish(target, "old")
    _killed_at(target, step)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left != ["out"], f"the kill at {step!r} left nothing to recover"
    # the next replacement first restores (killed before the new folder was in) or finishes
    with pytest.raises(ReplaceError, match="exists and is not empty"):
        with replacing(target, what="test", overwrite=False):
            pass
    expected = "old" if step in ("writing", "set aside") else "new"
    assert _tree(target) == {"sub/weights": expected}, left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_temporaries_are_matched_by_exact_name_never_as_a_glob(tmp_path):
    others = [".hf1.old", ".hf1.tmp-" + "0" * 32, ".hf2.old-abcd1234", ".hf[12].older", ".hf[12].old.x"]
    for name in others:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(name)
    (tmp_path / ".hf[12].old").mkdir()  # its own, left aside: restored
    (tmp_path / ".hf[12].old" / "f").write_text("mine")
    (tmp_path / ".hf[12].tmp-export-abcd1234").mkdir()  # an earlier version's staging folder
    _publish(tmp_path / "hf[12]", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*others, "hf[12]"])
    assert all((tmp_path / name / "f").read_text() == name for name in others)


def test_published_folders_get_the_umasks_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        _publish(tmp_path / "shared", "x")
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    assert modes == {"shared": 0o755, "shared/sub": 0o755, "shared/sub/weights": 0o644}
