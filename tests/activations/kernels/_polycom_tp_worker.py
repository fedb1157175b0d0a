"""One rank of the TP=2 fused PolyCom check (``python -m tests.activations.kernels._polycom_tp_worker``,
launched by test_polycom_kernels_tp.py; not a test).

Each rank holds its half of the FFN dimension and runs ``polycom_fused`` with the world group as
the TP group; it compares output, dx (all-gathered), d weight and d bias with the TP=1 fused
result on the full row, with the torch reference (TP=1 and TP=2), and across ranks.

Env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (gloo); TRITON_INTERPRET=1 without CUDA.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dense_model.activations._polycom import polycom_reference
from dense_model.activations.kernels.polycom import PolyComKernelConfig, polycom_fused
from tests.activations.kernels._polycom_helpers import assert_close_rel, relative_tolerance, run

# (rows, local columns, config): the default chunks (a row shorter than one), and 32-column chunks
# with 2 programs (several chunks, a tail, several rows per program); 4128 = half of 8256.
CASES = [
    (5, 37, PolyComKernelConfig()),
    (3, 129, PolyComKernelConfig(block=32, max_programs=2)),
    (2, 4128, PolyComKernelConfig(max_programs=1)),
]


def gather_last_dim(t, group):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    checked = 0
    for inner in ("norm", "relu"):
        for dtype in (torch.float32, torch.bfloat16):
            for case, (rows, local, cfg) in enumerate(CASES):
                gen = torch.Generator().manual_seed(100 + case)  # same full tensors on every rank
                full = (rows, local * world)
                x = torch.randn(full, generator=gen).to(dtype)
                grad = torch.randn(full, generator=gen).to(dtype)
                weight, bias = torch.randn(3, generator=gen), torch.randn(1, generator=gen)
                cols = slice(rank * local, (rank + 1) * local)
                kw = dict(inner=inner, eps=1e-6)
                tp = run(
                    polycom_fused, x[:, cols], weight, bias, grad[:, cols], tp_group=group, config=cfg, **kw
                )
                one = run(polycom_fused, x, weight, bias, grad, config=cfg, **kw)
                ref = run(polycom_reference, x, weight, bias, grad, **kw)
                ref_tp = run(polycom_reference, x[:, cols], weight, bias, grad[:, cols], tp_group=group, **kw)
                y, dx = gather_last_dim(tp[0], group), gather_last_dim(tp[1], group)
                ref_tp_full = (gather_last_dim(ref_tp[0], group), gather_last_dim(ref_tp[1], group))
                rtol = relative_tolerance(dtype)
                label = f"rank {rank} {inner} {dtype} rows={rows} local={local}"
                for name, a, b, c, d in zip(
                    ("y", "dx", "d_weight", "d_bias"),
                    (y, dx, tp[2], tp[3]),
                    one,
                    ref,
                    (*ref_tp_full, *ref_tp[2:]),
                ):
                    assert_close_rel(a, b, rtol, f"{label} {name} vs TP=1 fused")
                    assert_close_rel(a, c, rtol, f"{label} {name} vs TP=1 reference")
                    assert_close_rel(a, d, rtol, f"{label} {name} vs TP=2 reference")
                # The replicated scalars' grads must be identical on every TP rank (bitwise).
                for name, t in (("d_weight", tp[2]), ("d_bias", tp[3])):
                    gathered = [torch.empty_like(t) for _ in range(world)]
                    dist.all_gather(gathered, t, group=group)
                    assert all(torch.equal(gathered[0], g) for g in gathered), f"{label} {name} differs"
                checked += 1
    dist.barrier()
    print(f"rank {rank}: {checked} TP={world} cases match", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
