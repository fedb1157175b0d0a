"""Compile every PolyCom kernel for an H100 (sm_90a) without a GPU; print registers and spills.

Run by test_polycom_kernels_compile.py in a process without TRITON_INTERPRET (the interpreter
would skip the compiler): Triton lowers the kernels to PTX and its bundled ptxas assembles them,
so code that only the interpreter accepts fails here. Usable by hand too:

    python tests/activations/kernels/_polycom_compile_sm90.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dense_model.activations.kernels import polycom_triton as K  # noqa: E402

FP32_POINTERS = {"INV", "SUMSQ", "MOM", "PART"}
FLOAT_SCALARS = {"eps", "inv_width"}


def signature(fn, data: str, params: str, consts: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in FP32_POINTERS:
            sig[name] = "*fp32"
        elif name in ("W", "B"):
            sig[name] = f"*{params}"
        elif name.isupper():
            sig[name] = f"*{data}"
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


KERNELS = (
    "polynorm_fwd_fused_kernel",
    "polynorm_bwd_fused_kernel",
    "polynorm_fwd_stats_kernel",
    "polynorm_bwd_stats_kernel",
    "polynorm_fwd_apply_kernel",
    "polynorm_bwd_apply_kernel",
    "polyrelu_fwd_kernel",
    "polyrelu_bwd_kernel",
)


def cases():
    # The launcher's choices at the 1B shape, order 3: 8256 columns at TP=1 (8 x 1024 + a 64-column
    # tail), 4128 at TP=2 (4 x 1024 + 32), and a 2048-column chunk variant the sweep tries.
    for data in ("bf16", "fp32"):
        for block, tail, warps in ((1024, 64, 4), (1024, 32, 4), (2048, 64, 8)):
            for name in KERNELS:
                yield name, data, dict(ORDER=3, PAD=4, BLOCK=block, TAIL=tail), warps


def ptxas_report(ptx: str) -> str:
    """'N registers, S bytes spilled' from the bundled ptxas -v (best effort)."""
    version = re.search(r"^\.version (\d+)\.(\d+)", ptx, re.M)
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for exe in ("ptxas", "ptxas-blackwell"):
        path = os.path.join(bindir, exe)
        if not os.path.exists(path):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "k.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            proc = subprocess.run(
                [path, "-v", "--gpu-name=sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                capture_output=True,
                text=True,
            )
        if proc.returncode == 0:
            regs = re.search(r"Used (\d+) registers", proc.stderr)
            spill = re.search(r"(\d+) bytes spill stores", proc.stderr)
            return f"{regs.group(1) if regs else '?'} registers, {spill.group(1) if spill else '?'} bytes spilled"
    return f"(no ptxas for PTX {version.group(0) if version else '?'})"


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    for name, data, consts, warps in cases():
        fn = getattr(K, name)
        src = ASTSource(fn, signature(fn, data, "fp32", consts), consts)
        compiled = triton.compile(src, target=target, options={"num_warps": warps})
        assert compiled.asm.get("cubin"), f"{name}: no cubin"
        print(f"{name} {data} {consts} num_warps={warps}: {ptxas_report(compiled.asm['ptx'])}", flush=True)
    print("compiled all kernels for sm_90a")
    return 0


if __name__ == "__main__":
    sys.exit(main())
