"""dense_model.collectives: tensors for collectives live on the group's device, the helpers agree
over gloo, and no other module of the package calls torch.distributed collectives directly."""

import ast
from pathlib import Path

import torch

from dense_model.testing import spawn_workers

PACKAGE = Path(__file__).resolve().parents[1] / "dense_model"
COLLECTIVES = {
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
    "all_to_all",
    "all_to_all_single",
}
# Modules allowed to call collectives themselves: the helper, and the activation code whose
# collectives act on activations (already on the model's device).
ALLOWED = {"collectives.py", "activations/_polycom.py"}
ALLOWED_DIRS = ("activations/kernels/",)


def test_nccl_groups_get_gpu_tensors_and_gloo_groups_cpu_tensors():
    from dense_model.collectives import device_for_backend

    assert device_for_backend("nccl").type == "cuda"
    assert device_for_backend("gloo") == torch.device("cpu")
    assert device_for_backend("cpu:gloo,cuda:nccl") == torch.device("cpu")  # takes CPU tensors


def _direct_collective_calls(path: Path) -> list[str]:
    """``dist.X(...)`` / ``torch.distributed.X(...)`` calls with X a collective, as 'line: X'."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in COLLECTIVES:
            continue
        owner = ast.unparse(node.func.value)
        if owner in ("dist", "torch.distributed"):
            found.append(f"{node.lineno}: {owner}.{node.func.attr}")
    return found


def test_only_the_helper_module_calls_collectives():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ALLOWED or rel.startswith(ALLOWED_DIRS):
            continue
        offenders += [f"dense_model/{rel}:{call}" for call in _direct_collective_calls(path)]
    assert not offenders, (
        "collectives outside dense_model/collectives.py (use its helpers, which allocate on the "
        f"group's device): {offenders}"
    )


def test_the_scan_sees_a_direct_call(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch.distributed as dist\nimport torch\n\ndist.all_reduce(t)\ntorch.distributed.broadcast(t, 0)\n"
    )
    assert _direct_collective_calls(bad) == ["4: dist.all_reduce", "5: torch.distributed.broadcast"]


def _helpers(rank, world_size, out_dir):
    import torch.distributed as dist

    from dense_model import collectives

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    result = {
        "any_one": collectives.any_rank(rank == 1),
        "any_none": collectives.any_rank(False),
        "max": collectives.all_reduce_max([float(rank), -float(rank)]),
        "sum": collectives.sum_over_group(torch.tensor([1.0, rank + 1.0])).tolist(),
        "device": str(collectives.communication_device()),
        "gathered": collectives.all_gather_objects({"rank": rank}),
    }
    collectives.barrier()
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_helpers_over_gloo(tmp_path):
    spawn_workers(_helpers, 2, str(tmp_path))
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r == {
            "any_one": True,
            "any_none": False,
            "max": [1.0, 0.0],
            "sum": [2.0, 3.0],
            "device": "cpu",
            "gathered": [{"rank": 0}, {"rank": 1}],
        }


# Helpers that stage tensors for a collective, with the call that exercises each. A new helper must
# be added here (test_every_staging_helper_is_checked), so that its staging device is checked.
STAGING_CALLS = {
    "all_reduce_max_tensor": lambda c: c.all_reduce_max_tensor(torch.tensor([1.0])),
    "all_reduce_max": lambda c: c.all_reduce_max([1.0, 2.0]),
    "any_rank": lambda c: c.any_rank(True),
    "sum_over_group": lambda c: c.sum_over_group(torch.tensor([1.0])),
    "broadcast_from_last_stage": lambda c: c.broadcast_from_last_stage(1.0),
    "send": lambda c: c.send(torch.tensor([1.0]), 0),
    "recv_into": lambda c: c.recv_into(torch.tensor([1.0]), 0),
    "broadcast_tensor": lambda c: c.broadcast_tensor(torch.tensor([1.0]), 0),
}
# all_gather_objects, broadcast_object: torch pickles onto the group's device itself
NOT_STAGING = {
    "device_for_backend",
    "communication_device",
    "barrier",
    "rank",
    "all_gather_objects",
    "broadcast_object",
}


def test_every_staging_helper_is_checked():
    import inspect

    from dense_model import collectives

    public = {
        name
        for name, fn in inspect.getmembers(collectives, inspect.isfunction)
        if fn.__module__ == collectives.__name__ and not name.startswith("_")
    }
    assert public - NOT_STAGING == set(STAGING_CALLS)


def _staging_devices(rank, world_size, out_dir):
    """Each helper over a real PP=2 gloo layout, with communication_device(group) saying "meta"
    (standing in for an NCCL group's GPU) and torch.distributed's collectives replaced by recorders
    of the devices they are handed (meta tensors cannot be reduced; the helpers fail after the
    collective when they read the result, which is expected here)."""
    import torch.distributed as dist

    from dense_model import collectives
    from dense_model.parallel import initialize_parallel

    initialize_parallel(1, 2)
    collectives.communication_device = lambda group=None: torch.device("meta")
    seen = []

    def recorder(tensor, *args, **kwargs):
        seen.append(tensor.device.type)

    dist.all_reduce = dist.broadcast = dist.send = dist.recv = recorder
    devices = {}
    for name, call in STAGING_CALLS.items():
        seen.clear()
        try:
            call(collectives)
        except (NotImplementedError, RuntimeError):  # reading a meta tensor's value
            pass
        devices[name] = list(seen)
    torch.save(devices, f"{out_dir}/rank{rank}.pt")


def test_helpers_stage_on_the_groups_communication_device(tmp_path):
    """A helper staging a flag on the CPU passes every gloo test but fails on NCCL (no CPU
    backend): here the group's device is "meta", and every collective must be handed meta tensors."""
    spawn_workers(_staging_devices, 2, str(tmp_path))
    for rank in range(2):
        devices = torch.load(tmp_path / f"rank{rank}.pt")
        assert devices == {name: ["meta"] for name in STAGING_CALLS}, devices
