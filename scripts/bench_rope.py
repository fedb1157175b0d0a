"""Benchmark RoPE alone at the 1B shape: megatron-core's unfused path against our Triton kernel.

Times forward and forward+backward of RoPE on one [s, b, h, d] tensor (the query; the key is the
same shape without GQA) with megatron's frequencies ([s, 1, 1, d], halves layout):

  unfused  megatron-core's ``_apply_rotary_pos_emb_bshd`` (what runs without TE and without fusion)
  fused    ``dense_model.rope.fused_apply_rotary_pos_emb`` (what ``model.rope_fusion`` installs)

and reports the achieved bandwidth of the fused pass (an ideal kernel reads t and writes y forward,
reads dy and writes dt backward) against the bytes moved. The fused output and gradient are checked
first against the unfused path run in fp32 on the same input.

    python scripts/bench_rope.py                      # H100/H200, bf16, s 4096, b 2, h 16, d 128
    python scripts/bench_rope.py --json rope.json
    python scripts/bench_rope.py --device cpu         # smoke run: tiny shape, Triton interpreter, no timings

Timings use triton.testing.do_bench (CUDA events, L2 flushed before each run, median).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402  (does not import triton: TRITON_INTERPRET can still be set in main)

import dense_model.benchmarking as bench  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    p = bench.kernel_bench_parser(__doc__, "cpu: smoke run under the interpreter")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 4096; cpu 7)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch size (default 2; cpu 3)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default 16; cpu 5)")
    p.add_argument("--head-dim", type=int, default=None, help="head dim (default 128; cpu 16)")
    p.add_argument("--rotary-percent", type=float, default=1.0, help="rotary share of the head dim")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    p.add_argument("--json", default=None, metavar="PATH", help="write results as JSON ('-' for stdout)")
    return p.parse_args(argv)


def megatron_freqs(seq: int, rot_dim: int, device) -> torch.Tensor:
    """RotaryEmbedding's [s, 1, 1, rot_dim] angles (base 10000, halves layout)."""
    inv = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device=device) / rot_dim))
    angles = torch.outer(torch.arange(seq, dtype=torch.float32, device=device), inv)
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]


def main(argv=None) -> int:
    args = parse_args(argv)
    cpu = bench.kernel_bench_device("bench_rope", args.device)  # before the kernel is defined
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from dense_model.rope import fused_apply_rotary_pos_emb

    s = args.seq or (7 if cpu else 4096)
    b = args.batch or (3 if cpu else 2)
    h = args.heads or (5 if cpu else 16)
    d = args.head_dim or (16 if cpu else 128)
    rot = int(d * args.rotary_percent) // 2 * 2
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device=args.device).manual_seed(0)
    t = torch.randn(s, b, h, d, device=args.device, dtype=dtype, generator=gen).requires_grad_()
    grad = torch.randn(s, b, h, d, device=args.device, dtype=dtype, generator=gen)
    freqs = megatron_freqs(s, rot, args.device)
    variants = {
        "unfused": lambda x: _apply_rotary_pos_emb_bshd(x, freqs),
        "fused": lambda x: fused_apply_rotary_pos_emb(x, freqs),
    }

    # The check: fused against the unfused path in fp32 on the same input (the fused kernel computes
    # in fp32 and rounds once: within one bf16 ulp; the unfused bf16 path rounds more often).
    t32 = t.detach().float().requires_grad_()
    y32 = _apply_rotary_pos_emb_bshd(t32, freqs)
    (dt32,) = torch.autograd.grad(y32, t32, grad.float())
    y = fused_apply_rotary_pos_emb(t, freqs)
    (dt,) = torch.autograd.grad(y, t, grad)
    tol = 2**-7 if dtype == torch.bfloat16 else 1e-5
    for got, ref in ((y, y32), (dt, dt32)):
        torch.testing.assert_close(got.detach().float(), ref, rtol=tol, atol=1e-5)

    rows, results = [], {}
    ideal = 2 * t.numel() * t.element_size()  # one read, one write per pass
    for name, fn in variants.items():
        fwd_ms = fwd_bwd_ms = None
        if not cpu:
            from triton.testing import do_bench

            def fwd(fn=fn):
                with torch.no_grad():
                    fn(t)

            def fwd_bwd(fn=fn):
                torch.autograd.grad(fn(t), t, grad)

            fwd_ms = do_bench(fwd, warmup=args.warmup, rep=args.rep, return_mode="median")
            fwd_bwd_ms = do_bench(fwd_bwd, warmup=args.warmup, rep=args.rep, return_mode="median")
        gbs = None if fwd_bwd_ms is None else 2 * ideal / fwd_bwd_ms / 1e6
        results[name] = {"fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms, "ideal_gbs": gbs}
        rows.append([name, bench.fmt(fwd_ms, ".4f"), bench.fmt(fwd_bwd_ms, ".4f"), bench.fmt(gbs, ".0f")])

    meta = bench.run_metadata(shape=[s, b, h, d], rotary_dim=rot, dtype=args.dtype)
    print(bench.metadata_lines(meta))
    print(
        f"\nRoPE on one [{s}, {b}, {h}, {d}] {args.dtype} tensor, rotary dim {rot}; fused ≡ unfused checked\n"
    )
    print(bench.markdown_table(["variant", "fwd ms", "fwd+bwd ms", "GB/s (ideal bytes)"], rows))
    bench.write_json(args.json, {"meta": meta, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
