"""A save onto a full filesystem (a real tmpfs of a few MiB mounted on the run's checkpoints/): the
job stops with one line naming the path, the space free and what checkpoint.keep_last needs, the
partial save is removed, the tracker still names the previous checkpoint and a relaunch (with room
again) resumes it. Needs root (mount); skipped where tmpfs cannot be mounted."""

import subprocess

import pytest

from dense_model.checkpoint.layout import folder_bytes
from tests.training.pretrain_jobs import train_in_workers, trained_ok

pytestmark = pytest.mark.slow

RUN = ["logging.eval_interval=0", "checkpoint.save_interval=4", "checkpoint.keep_last=2"]


@pytest.fixture
def small_disk(tmp_path):
    """mount(path, size) puts a tmpfs of ``size`` bytes on ``path``; remount(path, size) resizes it
    keeping its files; all unmounted at the end."""
    mounted = []

    def mount(path, size, remount=False):
        path.mkdir(parents=True, exist_ok=True)
        options = f"{'remount,' if remount else ''}size={size}"
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
        )
        if done.returncode and not remount:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
        assert done.returncode == 0, done.stderr
        if not remount:
            mounted.append(path)

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_save_onto_a_full_disk_says_so_and_the_previous_checkpoint_stays_the_resume_point(
    tiny_config, small_disk
):
    config, run_dir = tiny_config("full", *RUN)
    ckpts = run_dir / "checkpoints"
    small_disk(ckpts, 64 << 20)
    trained_ok(config, "training.train_iters=4")  # the step-4 checkpoint
    size = folder_bytes(ckpts / "iter_0000004")
    used = folder_bytes(ckpts)
    small_disk(ckpts, used + size // 2 + (64 << 10), remount=True)  # room for half a checkpoint more

    code, out = train_in_workers(config, "training.train_iters=5")  # its last step saves
    assert code == 1, out
    line = out.strip().splitlines()[-1]  # after megatron-core's writer's own report of its failure
    assert line.startswith(
        f"error: checkpoint of step 5 not saved: no space left on the filesystem of {ckpts} ("
    ), line
    assert " free of " in line and "the partial save removed" in line, line
    assert "checkpoint.keep_last=2 needs room for 3 checkpoints (2 kept and the one being written: " in line
    assert "the step-4 checkpoint is still the resume point" in line, line
    assert "Traceback" not in out, out
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter_0000004", "latest_checkpointed_iteration.txt"]

    small_disk(ckpts, 64 << 20, remount=True)  # space freed: the relaunch resumes step 4
    out = trained_ok(config, "training.train_iters=5")
    assert f"resumed from {ckpts}/iter_0000004 at step 4" in out, out
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == "5"
