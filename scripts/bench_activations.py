"""Benchmark the MLP activation alone at the 1B shape: time, memory and bandwidth, forward+backward.

For PolyNorm and PolyReLU on [tokens, 8256] and SwiGLU on [tokens, 2 x 5504] (bf16 by default), it
times forward and forward+backward of:

  fused       our Triton kernels (dense_model.activations.kernels.polycom.polycom_fused)
  torch       our torch reference (fp32 statistics; what the registry runs without the kernels)
  paper-ckpt  the reference code's style: the paper's torch ops in the input dtype inside
              torch.utils.checkpoint (recomputed in backward)
  liger       Liger-Kernel's LigerPolyNormFunction (PolyNorm) / LigerSiLUMulFunction (SwiGLU),
              when liger_kernel imports

and reports peak memory above the inputs (forward+backward), memory kept alive between forward and
backward (the activation memory a layer holds), and the achieved bandwidth: the bytes an ideal
kernel must move (forward reads x, writes y; backward reads x and dy, writes dx) divided by the
forward+backward time, against the device's copy bandwidth measured here with a 1 GiB
tensor.copy_ (read + write). Fused outputs are checked against the torch reference first.

    python scripts/bench_activations.py                        # H100/H200: markdown table
    python scripts/bench_activations.py --json results.json    # also machine-readable
    python scripts/bench_activations.py --sweep                # pick the kernels' tile per width (below)
    python scripts/bench_activations.py --device cpu           # smoke run: tiny shapes, Triton interpreter

Timings use triton.testing.do_bench (CUDA events, L2 flushed before each run, median).

``--sweep`` times the fused PolyNorm and PolyReLU forward+backward over launch configurations
(column chunk ``block``, ``num_warps``, ``programs_per_sm`` of ``PolyComKernelConfig``) at each width
of ``--sweep-widths`` (default: 8256 = the 1B PolyCom width at TP=1, its TP=2/4/8 shards 4128, 2064,
1032, and 5504) and reports the fastest per width: the values to put in ``PolyComKernelConfig``.
On the CPU it runs one configuration per width through the interpreter (code paths only).
Liger's kernels are left out on the CPU (they are not written for the interpreter).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402  (does not import triton: TRITON_INTERPRET can still be set in main)

from dense_model.benchmarking import (  # noqa: E402
    fmt,
    kernel_bench_device,
    kernel_bench_parser,
    markdown_table,
    metadata_lines,
    run_metadata,
    write_json,
)


def parse_args(argv=None):
    p = kernel_bench_parser(__doc__, "cpu: smoke run under TRITON_INTERPRET=1")
    p.add_argument("--tokens", type=int, default=None, help="rows (default 8192; 8 with --device cpu)")
    p.add_argument("--ffn", type=int, default=None, help="PolyCom width (default 8256; 96 on cpu)")
    p.add_argument("--swiglu-ffn", type=int, default=None, help="SwiGLU FFN width (default 5504; 64 on cpu)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--activations", default="polynorm,polyrelu,swiglu", help="comma-separated subset")
    p.add_argument("--variants", default="fused,torch,paper-ckpt,liger", help="comma-separated subset")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=200, help="do_bench repetitions (ms)")
    p.add_argument(
        "--sweep", action="store_true", help="also time launch configs of the fused kernels per width"
    )
    p.add_argument(
        "--sweep-widths",
        default=None,
        help="comma-separated widths (default 8256,4128,2064,1032,5504; 40,77 on cpu)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the fused-vs-reference parity check")
    p.add_argument("--json", default=None, metavar="PATH", help="write results as JSON ('-' for stdout)")
    return p.parse_args(argv)


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


# ----------------------------------------------------------------------------------------------
# The implementations compared
# ----------------------------------------------------------------------------------------------


def paper_polynorm(x, weight, bias, eps=1e-6):
    """The reference code's PolyNorm: torch ops in the input dtype; weight[0] multiplies N(x^3)."""

    def norm(u):
        return u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps)

    return weight[0] * norm(x**3) + weight[1] * norm(x**2) + weight[2] * norm(x) + bias


def paper_polyrelu(x, weight, bias):
    """The reference code's PolyReLU: torch ops in the input dtype; weight[0] multiplies relu(x)^3."""
    r = torch.relu(x)
    return weight[0] * r**3 + weight[1] * r**2 + weight[2] * r + bias


def checkpointed(fn):
    def run(*args):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)

    return run


def liger_polynorm():
    try:
        from liger_kernel.ops.poly_norm import LigerPolyNormFunction
    except Exception:
        return None

    def run(x, weight, bias):  # Liger takes a 0-dim bias; in_place=True is its default (dy reused)
        return LigerPolyNormFunction.apply(x, weight, bias.reshape(()), 1e-6, True)

    return run


def liger_swiglu():
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except Exception:
        return None

    def run(x):
        gate, up = torch.chunk(x, 2, dim=-1)
        return LigerSiLUMulFunction.apply(gate, up)

    return run


def build_variants(activation, names, config=None):
    """{variant: (f(x, weight, bias) -> y, needs_params)} for the activation."""
    from dense_model.activations._polycom import polycom_reference
    from dense_model.activations.glu import SwiGLU

    out = {}
    if activation in ("polynorm", "polyrelu"):
        inner = "norm" if activation == "polynorm" else "relu"
        if "fused" in names:
            from dense_model.activations.kernels.polycom import polycom_fused

            out["fused"] = lambda x, w, b: polycom_fused(x, w, b, inner=inner, eps=1e-6, config=config)
        if "torch" in names:
            out["torch"] = lambda x, w, b: polycom_reference(x, w, b, inner=inner, eps=1e-6)
        if "paper-ckpt" in names:
            out["paper-ckpt"] = checkpointed(paper_polynorm if inner == "norm" else paper_polyrelu)
        if "liger" in names and inner == "norm" and (fn := liger_polynorm()) is not None:
            out["liger"] = fn
    elif activation == "swiglu":
        swiglu = SwiGLU()
        if "torch" in names:
            out["torch"] = lambda x, w, b: swiglu(x)
        if "paper-ckpt" in names:
            out["torch-ckpt"] = lambda x, w, b: torch.utils.checkpoint.checkpoint(
                swiglu, x, use_reentrant=False
            )
        if "liger" in names and (fn := liger_swiglu()) is not None:
            out["liger"] = lambda x, w, b: fn(x)
    else:
        raise SystemExit(f"unknown activation {activation!r}")
    return out


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def make_inputs(rows, width, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(rows, width, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = torch.full((3,), 1.0 / 3.0, device=device, requires_grad=True)
    bias = torch.zeros(1, device=device, requires_grad=True)
    return x, weight, bias


def timer(args):
    if args.device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")

    raise RuntimeError("timings are taken on CUDA only")


def copy_bandwidth_gbs(args):
    """Device copy bandwidth (GB/s, read + write) of a 1 GiB tensor.copy_; None on the CPU."""
    if args.device != "cuda":
        return None
    src = torch.empty(2**28, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = timer(args)(lambda: dst.copy_(src))
    return 2 * src.nbytes / ms / 1e6


def saved_bytes_per_token(fn, x, weight, bias) -> float:
    """Bytes autograd keeps from forward to backward, per row, not counting x's own storage.

    x is fc1's output and alive anyway; everything else an activation saves (fp32 copies, powers,
    statistics) is memory it adds per layer. Measured with saved-tensor hooks over unique storages,
    so it is the same on any device (Liger's kernel included; checkpointed variants save nothing
    beyond their inputs).
    """
    storages = {}
    x_ptr = x.untyped_storage().data_ptr()

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() != x_ptr:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x, weight, bias)
    del y
    return sum(storages.values()) / x.shape[0]


def measure(fn, x, weight, bias, args, ideal_bytes):
    leaves = [x, weight, bias]
    dy = torch.randn(x.shape[0], ideal_bytes["out_width"], device=x.device, dtype=x.dtype)
    saved = saved_bytes_per_token(fn, x, weight, bias)

    def forward():
        return fn(x, weight, bias)

    def forward_backward():
        y = fn(x, weight, bias)
        used = [t for t in leaves if t.requires_grad]
        torch.autograd.grad(y, used, dy, allow_unused=True)

    if args.device != "cuda":  # smoke run: exercise both passes, report no timings
        forward()
        forward_backward()
        empty = dict.fromkeys(
            ("fwd_ms", "fwd_bwd_ms", "kept_after_fwd_mib", "peak_fwd_bwd_mib", "achieved_gbs")
        )
        return {**empty, "saved_bytes_per_token": saved}
    bench = timer(args)
    result = {"fwd_ms": bench(forward), "fwd_bwd_ms": bench(forward_backward), "saved_bytes_per_token": saved}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y = forward()
    kept = torch.cuda.memory_allocated() - base  # y + what autograd saved for backward
    torch.autograd.grad(y, [t for t in leaves if t.requires_grad], dy, allow_unused=True)
    del y
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    result.update(kept_after_fwd_mib=kept / 2**20, peak_fwd_bwd_mib=peak / 2**20)
    result["achieved_gbs"] = (ideal_bytes["fwd"] + ideal_bytes["bwd"]) / result["fwd_bwd_ms"] / 1e6
    return result


def ideal_bytes(activation, rows, width, itemsize):
    """Bytes an ideal fused kernel moves: forward x -> y; backward x, dy -> dx."""
    if activation == "swiglu":  # x [rows, 2w] -> y [rows, w]
        n_in, n_out = 2 * rows * width, rows * width
    else:
        n_in = n_out = rows * width
    return {"fwd": (n_in + n_out) * itemsize, "bwd": (2 * n_in + n_out) * itemsize, "out_width": width}


def parity(activation, x, weight, bias):
    """Max error of fused vs the torch reference at the benchmark shape, relative to max |ref|."""
    from dense_model.activations._polycom import polycom_reference
    from dense_model.activations.kernels.polycom import polycom_fused

    inner = "norm" if activation == "polynorm" else "relu"
    dy = torch.randn_like(x)
    errors = {}
    results = []
    for fn in (polycom_fused, polycom_reference):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
        y = fn(*leaves, inner=inner, eps=1e-6)
        grads = torch.autograd.grad(y, leaves, dy)
        results.append((y, *grads))
    for name, a, e in zip(("y", "dx", "d_weight", "d_bias"), *results):
        a, e = a.float(), e.float()
        errors[name] = ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
    return errors


SWEEP_GRID = dict(block=(512, 1024, 2048, 4096), num_warps=(4, 8), programs_per_sm=(2, 4, 8))


def sweep_configs(cpu: bool) -> list[dict]:
    """Every combination of SWEEP_GRID (the first value of each on the CPU: one smoke config)."""
    import itertools

    names = list(SWEEP_GRID)
    grid = [values[:1] if cpu else values for values in SWEEP_GRID.values()]
    return [dict(zip(names, combo)) for combo in itertools.product(*grid)]


def do_bench_short(fn) -> float:
    """Median ms of ``fn`` over ~50 ms of repetitions (the sweep times many configurations)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def sweep(args, rows: int, widths: list[int], dtype) -> list[dict]:
    """Per (activation, width): every config's fwd+bwd ms (None on the CPU) and the fastest."""
    from dense_model.activations.kernels.polycom import PolyComKernelConfig

    out = []
    for activation in ("polynorm", "polyrelu"):
        for width in widths:
            x, weight, bias = make_inputs(rows, width, dtype, args.device)
            nbytes = ideal_bytes(activation, rows, width, x.element_size())
            timings = []
            dy = torch.randn_like(x)
            for params in sweep_configs(args.device == "cpu"):
                fn = build_variants(activation, {"fused"}, PolyComKernelConfig(**params))["fused"]

                def fwd_bwd(fn=fn, leaves=(x, weight, bias), dy=dy):
                    torch.autograd.grad(fn(*leaves), list(leaves), dy)

                fwd_bwd()  # compiles this configuration (or runs it once in the interpreter)
                ms = do_bench_short(fwd_bwd) if args.device == "cuda" else None
                gbs = (nbytes["fwd"] + nbytes["bwd"]) / ms / 1e6 if ms else None
                timings.append({**params, "fwd_bwd_ms": ms, "achieved_gbs": gbs})
            timed = [t for t in timings if t["fwd_bwd_ms"] is not None]
            best = min(timed, key=lambda t: t["fwd_bwd_ms"]) if timed else None
            out.append({"activation": activation, "width": width, "configs": timings, "best": best})
            if args.device == "cuda":
                torch.cuda.empty_cache()
    return out


def sweep_markdown(results) -> str:
    columns = ["activation", "width", "configs", "best block", "warps", "programs/SM", "fwd+bwd ms", "GB/s"]
    cells = []
    for r in results:
        b = r["best"] or {}
        cells.append(
            [r["activation"], str(r["width"]), str(len(r["configs"])), str(b.get("block", "n/a")),
             str(b.get("num_warps", "n/a")), str(b.get("programs_per_sm", "n/a")), fmt(b.get("fwd_bwd_ms"), ".3f"),
             fmt(b.get("achieved_gbs"), ".0f")]
        )  # fmt: skip
    return "\n".join(
        [
            "",
            "Sweep of the fused kernels' launch configuration (fastest per width):",
            "",
            markdown_table(columns, cells),
        ]
    )


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    cpu = kernel_bench_device("bench_activations", args.device)  # before triton is imported
    rows = args.tokens or (8 if cpu else 8192)
    ffn = args.ffn or (96 if cpu else 8256)
    swiglu_ffn = args.swiglu_ffn or (64 if cpu else 5504)
    dtype = getattr(torch, DTYPES[args.dtype])
    names = set(args.variants.split(","))
    if cpu:
        names.discard("liger")  # Liger's kernels are not written for Triton's interpreter

    meta = run_metadata(dtype=args.dtype, shapes={"polycom": [rows, ffn], "swiglu": [rows, 2 * swiglu_ffn]})
    copy_gbs = copy_bandwidth_gbs(args)
    meta["copy_bandwidth_gbs"] = copy_gbs
    rows_out = []
    checks = {}
    for activation in args.activations.split(","):
        width = swiglu_ffn if activation == "swiglu" else ffn
        in_width = 2 * width if activation == "swiglu" else width
        x, weight, bias = make_inputs(rows, in_width, dtype, args.device)
        if activation != "swiglu" and "fused" in names and not args.no_check:
            checks[activation] = parity(activation, x, weight, bias)
        nbytes = ideal_bytes(activation, rows, width, x.element_size())
        for variant, fn in build_variants(activation, names).items():
            res = measure(fn, x, weight, bias, args, nbytes)
            res["ideal_bytes"] = nbytes["fwd"] + nbytes["bwd"]
            res["pct_of_copy_bw"] = 100 * res["achieved_gbs"] / copy_gbs if copy_gbs else None
            rows_out.append({"activation": activation, "variant": variant, **res})
            if args.device == "cuda":
                torch.cuda.empty_cache()
    sweep_results = []
    if args.sweep:
        default = "40,77" if cpu else "8256,4128,2064,1032,5504"
        widths = [int(w) for w in (args.sweep_widths or default).split(",")]
        sweep_results = sweep(args, rows, widths, dtype)
    print(markdown(meta, rows_out, checks) + (sweep_markdown(sweep_results) if args.sweep else ""))
    write_json(args.json, {"meta": meta, "checks": checks, "results": rows_out, "sweep": sweep_results})
    return 0


def markdown(meta, rows, checks) -> str:
    lines = [
        metadata_lines(meta),
        f"{meta['dtype']}; shapes: PolyCom {meta['shapes']['polycom']}, SwiGLU input {meta['shapes']['swiglu']}; "
        f"copy bandwidth {fmt(meta['copy_bandwidth_gbs'], '.0f')} GB/s",
        "",
    ]
    if meta["device"].startswith("cpu"):
        lines += ["**CPU smoke run under the Triton interpreter: code paths exercised, nothing timed.**", ""]
    for act, err in checks.items():
        lines.append(
            f"Parity {act} fused vs torch reference (max |diff| / max |ref|): "
            + ", ".join(f"{k} {v:.1e}" for k, v in err.items())
        )
    columns = ["activation", "variant", "fwd ms", "fwd+bwd ms", "saved for bwd B/token", "kept after fwd MiB"]
    columns += ["peak fwd+bwd MiB", "GB/s (ideal bytes)", "% of copy BW"]
    cells = [
        [r["activation"], r["variant"], fmt(r["fwd_ms"], ".3f"), fmt(r["fwd_bwd_ms"], ".3f"),
         fmt(r["saved_bytes_per_token"], ".0f"), fmt(r["kept_after_fwd_mib"], ".1f"),
         fmt(r["peak_fwd_bwd_mib"], ".1f"), fmt(r["achieved_gbs"], ".0f"), fmt(r["pct_of_copy_bw"], ".1f")]
        for r in rows
    ]  # fmt: skip
    return "\n".join([*lines, "", markdown_table(columns, cells)])


if __name__ == "__main__":
    sys.exit(main())
