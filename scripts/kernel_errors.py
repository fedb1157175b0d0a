"""The error table of docs/benchmarks.md: how far the fused PolyCom kernels are from the torch reference.

Over the kernel tests' grid (1, 3 and 17 rows x 33, 100 and 257 columns, order 3, both inner
functions, the tests' seeds), it runs forward and backward through the fused kernels and through
the torch reference on the same inputs and prints, per input dtype, the worst
max|fused - ref| / max|ref| of y, dx, d weight and d bias. 16-bit outputs are 16-bit on both sides,
so their error includes one rounding step of that format.

    python scripts/kernel_errors.py --device cpu          # Triton interpreter (what the table shows)
    python scripts/kernel_errors.py                       # CUDA: the compiled kernels
    python scripts/kernel_errors.py --json errors.json    # also machine-readable
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402  (does not import triton: TRITON_INTERPRET can still be set in main)

from dense_model.activations._polycom import polycom_reference  # noqa: E402
from dense_model.activations.kernels.parity import (  # noqa: E402
    GRADIENTS,
    forward_backward,
    parity_inputs,
    relative_error,
)
from dense_model.benchmarking import markdown_table, metadata_lines, require_cuda, run_metadata, write_json  # noqa: E402

ROWS, COLUMNS, ORDER = (1, 3, 17), (33, 100, 257), 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def worst_errors(polycom_fused, dtype: torch.dtype, device: str) -> dict[str, float]:
    """The largest relative error of each output over the grid and both inner functions."""
    worst = dict.fromkeys(GRADIENTS, 0.0)
    for inner in ("norm", "relu"):
        for rows in ROWS:
            for cols in COLUMNS:
                # The seed of tests/activations/kernels/test_polycom_kernels.py::test_matches_reference.
                x, weight, bias, grad = parity_inputs(
                    (rows, cols), ORDER, dtype, device, seed=rows * 1000 + cols
                )
                fused = forward_backward(polycom_fused, x, weight, bias, grad, inner=inner, eps=1e-6)
                ref = forward_backward(polycom_reference, x, weight, bias, grad, inner=inner, eps=1e-6)
                for name, a, e in zip(GRADIENTS, fused, ref):
                    worst[name] = max(worst[name], relative_error(a, e))
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: under TRITON_INTERPRET=1")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated input dtypes (fp32, bf16, fp16)")
    p.add_argument("--json", default=None, help="also write the figures here ('-': stdout)")
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    require_cuda(
        "kernel_errors", args.device, "use --device cpu to run the kernels under Triton's interpreter"
    )
    from dense_model.activations.kernels.polycom import polycom_fused  # imports triton

    errors = {name: worst_errors(polycom_fused, DTYPES[name], args.device) for name in args.dtypes.split(",")}
    meta = run_metadata(grid={"rows": ROWS, "columns": COLUMNS, "order": ORDER})
    print(metadata_lines(meta))
    print()
    rows = [
        [name, *(f"{errors[name][g]:.1e}" if errors[name][g] else "0" for g in GRADIENTS)] for name in errors
    ]
    print(markdown_table(["input", "y", "dx", "d weight", "d bias"], rows))
    write_json(args.json, {"meta": meta, "errors": errors})
    return 0


if __name__ == "__main__":
    sys.exit(main())
