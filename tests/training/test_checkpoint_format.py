"""The distributed optimizer's checkpoint format, as real training jobs (the trainer on gloo ranks): dp_reshardable is what a
DP=2 run writes (read back through megatron-core), it resumes bitwise at the same layout (fully
parallel load) and at DP=1 with the losses of the uninterrupted run."""

import shutil

import pytest
import torch

from dense_model.testing import spawn_workers
from tests.training.pretrain_jobs import read_metrics, trained_ok

pytestmark = pytest.mark.slow

EIGHT = ["training.train_iters=8", "logging.eval_interval=0", "parallel.use_distributed_optimizer=true"]


def _read_format(rank, world_size, folder, out_file):
    """megatron-core's readers of a checkpoint's content metadata, common state and tensor index."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    common = dist_checkpointing.load_common_state_dict(folder)
    torch.save(
        {
            "content": dist_checkpointing.load_content_metadata(folder),
            "sharding_type": common["optimizer"]["param_state_sharding_type"],
            "keys": sorted(dist_checkpointing.load_tensors_metadata(folder)),
        },
        out_file,
    )


def _resume_copy(tiny_config, name, source_ckpts, iteration):
    """A new run directory whose checkpoints are ``source_ckpts`` up to ``iteration``."""
    config, run_dir = tiny_config(name)
    shutil.copytree(source_ckpts, run_dir / "checkpoints")
    for later in (run_dir / "checkpoints").glob("iter_*"):
        if int(later.name.split("_")[1]) > iteration:
            shutil.rmtree(later)
    (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return config, run_dir


def test_dp_reshardable_is_written_and_resumes_at_dp2_bitwise_and_at_dp1(tiny_config, tmp_path):
    config, ref_dir = tiny_config("dp2")
    trained_ok(config, *EIGHT, nproc=2)
    reference, _ = read_metrics(ref_dir)

    out = tmp_path / "format.pt"
    spawn_workers(_read_format, 1, str(ref_dir / "checkpoints" / "iter_0000004"), str(out))
    written = torch.load(out)
    assert written["content"]["distrib_optim_sharding_type"] == "dp_reshardable"
    assert written["sharding_type"] == "dp_reshardable"
    buckets = [k for k in written["keys"] if k.startswith("optimizer.distributed.dp_group_idx_0.gbuf_idx_0.")]
    assert buckets, written["keys"]
    assert not [k for k in written["keys"] if k.startswith("optimizer.state.")]  # no per-parameter copy

    config, same_dir = _resume_copy(tiny_config, "dp2_again", ref_dir / "checkpoints", 4)
    assert "at step 4" in trained_ok(config, *EIGHT, nproc=2)
    resumed, _ = read_metrics(same_dir)
    for step in range(5, 9):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])  # bitwise

    config, dp1_dir = _resume_copy(tiny_config, "dp1", ref_dir / "checkpoints", 4)
    assert "at step 4" in trained_ok(config, *EIGHT, nproc=1)
    resumed, _ = read_metrics(dp1_dir)
    for step in range(5, 9):  # step 6 on depends on the loaded Adam moments
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), step
