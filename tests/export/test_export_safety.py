"""export_hf.py cannot hurt its source or another export: an output that is, contains or lies
inside the checkpoint's run directory is refused (exit 2, the run intact), one export per output
at a time, and --overwrite swaps the old output for the new one by renames."""

import os
from pathlib import Path

import pytest

from dense_model.testing import spawn_workers
from tests.export.test_export_hf import LAYOUT_SPEC, _build_save, export_cli


def _save_job(rank, world_size, root, tokenizer):
    from dense_model.parallel import initialize_parallel

    initialize_parallel(1, 1)
    _build_save(LAYOUT_SPEC, tokenizer, root)


@pytest.fixture(scope="module")
def run(tmp_path_factory, spm_model):
    """A run directory with a checkpoint, metrics and TensorBoard-like files (what an export must keep)."""
    root = tmp_path_factory.mktemp("runs")
    spawn_workers(_save_job, 1, str(root), spm_model)
    run = root / LAYOUT_SPEC
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1").write_bytes(b"tb")
    return run


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def refused(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if "error" in x]
    return line


@pytest.mark.parametrize(
    "output, relation",
    [
        (lambda run: run, "is"),  # export RUN RUN --overwrite
        (lambda run: run / "checkpoints" / "..", "is"),
        (lambda run: run / "hf", "lies inside"),
        (lambda run: run / "checkpoints" / "iter_0000007", "lies inside"),
        (lambda run: run.parent, "contains"),
    ],
)
def test_output_over_its_own_run_is_refused_and_the_run_kept(run, tmp_path, output, relation):
    before = snapshot(run)
    source = run / "checkpoints" / "iter_0000007" if relation == "contains" else run
    line = refused(export_cli([source, output(run), "--overwrite"], tmp_path))
    assert f" {relation} the checkpoint's run directory {run}" in line, line
    assert "pick an output folder outside it" in line
    assert snapshot(run) == before


def test_output_through_a_symlink_into_the_run_is_refused(run, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(run)
    before = snapshot(run)
    line = refused(export_cli([run, link / "hf", "--overwrite"], tmp_path))
    assert "lies inside the checkpoint's run directory" in line
    assert snapshot(run) == before


def test_one_export_per_output_and_overwrite_swaps_by_renames(run, tmp_path):
    import stat

    from dense_model.export.output import staged_output
    from dense_model.fsreplace import target_lock

    out = tmp_path / "exports" / "hf"
    out.mkdir(parents=True)
    (out / "old_file").write_text("from an older export")
    # a concurrent export holds the output's lock: refused, nothing touched
    with target_lock(out, "export", "output folder"):
        line = refused(export_cli([run, out, "--overwrite"], tmp_path))
    assert f"output folder {out} is being written by another export (host " in line, line
    assert f"pid {os.getpid()}," in line
    assert (out / "old_file").is_file()

    # an export killed between its two renames left the old output aside, and a temporary
    with pytest.raises(KeyboardInterrupt):
        with staged_output(out, overwrite=True) as tmp:
            (tmp / "partial").write_text("x")
            os.rename(out, out.parent / ".hf.old")
            raise KeyboardInterrupt
    os.mkdir(out.parent / (".hf.tmp-" + "0" * 32))
    assert not out.exists()
    # the next export puts the old output back first (so, without --overwrite, it is refused)
    line = refused(export_cli([run, out], tmp_path))
    assert "exists and is not empty; remove it or pass --overwrite" in line, line
    assert (out / "old_file").read_text() == "from an older export"

    result = export_cli([run, out, "--overwrite", "--dtype", "float32"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "old_file").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]  # no temporary, old copy or lock left
    # published with the umask's permissions (others of a shared project can read it), not mkdtemp's 0700
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o666 & ~mask


def _run_with_linked_checkpoints(run: Path, tmp_path: Path) -> Path:
    """A copy of ``run`` whose checkpoints/ is a symlink to a folder elsewhere."""
    import shutil

    copy = Path(shutil.copytree(run, tmp_path / "linked" / "run", symlinks=True))
    store = tmp_path / "store"
    store.mkdir()
    shutil.move(copy / "checkpoints", store / "ckpts")
    (copy / "checkpoints").symlink_to(store / "ckpts")
    return copy


def test_export_over_its_run_with_symlinked_checkpoints_is_refused(run, tmp_path):
    linked = _run_with_linked_checkpoints(run, tmp_path)
    before, kept = snapshot(linked), snapshot(tmp_path / "store")
    line = refused(export_cli([linked, linked, "--overwrite"], tmp_path))
    assert f"output folder {linked} is the checkpoint's run directory" in line, line
    assert snapshot(linked) == before and snapshot(tmp_path / "store") == kept


def test_export_over_its_run_reached_through_a_bind_mount_is_refused(run, tmp_path):
    import shutil
    import subprocess

    src = Path(shutil.copytree(run, tmp_path / "data" / "run"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "--bind", str(tmp_path / "data"), str(mnt)], capture_output=True).returncode:
        pytest.skip("mount --bind is not allowed here (tests/test_fsreplace.py checks symlinks and a/../a)")
    try:
        before = snapshot(src)
        line = refused(export_cli([mnt / "run", src, "--overwrite"], tmp_path))
        assert f"output folder {src} is the checkpoint's run directory" in line, line
        assert snapshot(src) == before
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
