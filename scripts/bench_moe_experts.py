"""MoE experts: torch grouped-GEMM experts (dense_model.moe_experts) against SequentialMLP.

Two measurements, each alternating the two implementations (grouped, sequential, sequential,
grouped, ...) so a machine whose load drifts treats both alike:

``demo``: the CPU MoE demo (configs/moe/demo.yaml: 8 PolyNorm experts, top-2) trained through
``run_pretrain.sh`` with ``model.moe.grouped_gemm`` true and false, ``--rounds`` times each, for
``--iters`` steps (after one 8-step job, not counted, that prepares the demo data). Reports the trainer's logged tokens/s (each log interval after the first; the
first holds start-up) and the wall time of the whole job, and the largest loss difference between
the two implementations at any logged step (the losses must agree: same math).

``layer``: one MoE layer (megatron-core's MoELayer as our layer spec builds it: router, alltoall
dispatcher, experts) forward + backward on random hidden states [seq, mbs, hidden], by default in
the paper's MoE shape (configs/moe/polynorm.yaml: 64 experts, top-8, hidden 2048, PolyNorm experts
1536 wide, parameter-matched to 1024-wide SwiGLU) in bf16 on a GPU. Reports tokens/s (median over
``--iters`` timed steps after ``--warmup``) and peak GPU memory.

    python scripts/bench_moe_experts.py demo --rounds 3 --iters 30              # CPU
    python scripts/bench_moe_experts.py layer                                   # GPU, paper shape
    python scripts/bench_moe_experts.py layer --config configs/moe/swiglu.yaml  # SwiGLU experts
    python scripts/bench_moe_experts.py layer --device cpu --config configs/moe/demo.yaml --seq 128 --mbs 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dense_model import benchmarking as bench  # noqa: E402

IMPLS = {"grouped": "model.moe.grouped_gemm=true", "sequential": "model.moe.grouped_gemm=false"}


def alternating(rounds: int) -> list[str]:
    """grouped, sequential, sequential, grouped, ...: neither always goes first."""
    order = []
    for r in range(rounds):
        pair = ["grouped", "sequential"]
        order += pair if r % 2 == 0 else pair[::-1]
    return order


def run_demo(args) -> dict:
    from dense_model.testing import free_port

    results = {impl: {"tokens_per_sec": [], "wall_s": [], "losses": []} for impl in IMPLS}
    with tempfile.TemporaryDirectory() as tmp:
        # Not counted: a short job first (the demo's tokenizer and data are prepared on first use).
        for i, impl in [(-1, "grouped"), *enumerate(alternating(args.rounds))]:
            run_dir = Path(tmp, f"{impl}{i}")
            cmd = [
                "bash",
                str(ROOT / "run_pretrain.sh"),
                args.config,
                f"run_dir={run_dir}",
                f"training.train_iters={args.iters if i >= 0 else 8}",
                f"logging.log_interval={args.log_interval}",
                "logging.eval_interval=0",
                f"checkpoint.save_interval={args.iters + 1}",
                IMPLS[impl],
            ]
            env = {**os.environ, "PYTHON": sys.executable, "MASTER_PORT": str(free_port())}
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                tail = (proc.stdout + proc.stderr)[-3000:]
                sys.exit(f"bench_moe_experts: {impl} run failed ({proc.returncode}):\n{tail}")
            if i < 0:
                continue
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            train = [r for r in records if "loss" in r and "tokens_per_sec" in r]
            results[impl]["tokens_per_sec"] += [r["tokens_per_sec"] for r in train[1:]]
            results[impl]["wall_s"].append(wall)
            results[impl]["losses"].append({r["step"]: r["loss"] for r in train})
            print(f"  {impl:10s} round {i // 2}: {wall:.1f} s", file=sys.stderr)
    diff = max(
        abs(a[step] - b[step])
        for a in results["grouped"]["losses"]
        for b in results["sequential"]["losses"]
        for step in a
    )
    rows = []
    for impl, res in results.items():
        rows.append(
            [
                impl,
                bench.fmt(statistics.median(res["tokens_per_sec"]), ",.0f"),
                bench.fmt(min(res["tokens_per_sec"]), ",.0f")
                + " - "
                + bench.fmt(max(res["tokens_per_sec"]), ",.0f"),
                bench.fmt(statistics.median(res["wall_s"]), ".1f"),
            ]
        )
    header = ["experts", "tokens/s (median)", "tokens/s (range)", "job wall s (median)"]
    return {"results": results, "max_loss_difference": diff, "table": bench.markdown_table(header, rows)}


def build_layer(config: str, impl: str, device: torch.device, overrides: list[str]):
    """megatron-core's MoELayer as our layer spec builds it, on one process (EP = TP = 1)."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    from dense_model.config import load_config
    from dense_model.model import layer_spec, transformer_config

    cfg = load_config(
        config,
        [
            "data.demo=true",
            "parallel.expert_model_parallel_size=1",
            "parallel.tensor_model_parallel_size=1",
            "parallel.expert_tensor_parallel_size=1",
            "parallel.sequence_parallel=false",
            IMPLS[impl],
            *overrides,
        ],
    )
    spec = layer_spec(cfg.model, device).submodules.mlp
    tc = transformer_config(cfg, device=device)
    layer = build_module(
        spec, config=tc, layer_number=1, pg_collection=ProcessGroupCollection.use_mpu_process_groups()
    )
    return cfg, layer.to(device)


def run_layer(args) -> dict:
    from dense_model.parallel import initialize_parallel

    device = torch.device(args.device)
    initialize_parallel(1, 1, seed=1)
    results = {impl: {"times": []} for impl in IMPLS}
    layers = {}
    for impl in IMPLS:
        cfg, layers[impl] = build_layer(args.config, impl, device, args.overrides)
        layers[impl].train()
        kind = type(layers[impl].experts).__name__
        results[impl]["experts"] = kind
    m = cfg.model
    dtype = next(layers["grouped"].parameters()).dtype
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(args.seq, args.mbs, m.hidden_size, generator=gen) * 0.5).to(device, dtype)
    grad = torch.randn(args.seq, args.mbs, m.hidden_size, generator=gen).to(device, dtype)

    def step(layer):
        inp = x.detach().requires_grad_()
        out, _ = layer(inp)
        out.backward(grad)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for impl in IMPLS:  # warm-up, and each implementation's own peak memory
        layer = layers[impl]
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        for _ in range(args.warmup):
            step(layer)
            layer.zero_grad(set_to_none=True)
        sync()
        results[impl]["peak_mib"] = (
            (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
        )
    for impl in alternating(args.iters):
        layer = layers[impl]
        sync()
        start = time.perf_counter()
        step(layer)
        sync()
        results[impl]["times"].append(time.perf_counter() - start)
        layer.zero_grad(set_to_none=True)
    tokens = args.seq * args.mbs
    rows = []
    for impl, res in results.items():
        median = statistics.median(res["times"])
        res["tokens_per_sec"] = tokens / median
        rows.append(
            [
                impl,
                res["experts"],
                bench.fmt(median * 1e3, ".2f"),
                bench.fmt(res["tokens_per_sec"], ",.0f"),
                bench.fmt(res["peak_mib"], ",.0f"),
            ]
        )
    header = ["experts", "module", "fwd+bwd ms (median)", "tokens/s", "peak MiB above the weights"]
    shape = (
        f"{m.moe.num_experts} experts, top-{m.moe.router_topk}, hidden {m.hidden_size}, {m.activation} "
        f"experts, {dtype}, {args.seq} x {args.mbs} tokens"
    )
    return {"results": results, "shape": shape, "table": bench.markdown_table(header, rows)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    demo = sub.add_parser("demo", help="the CPU MoE demo trained with each implementation")
    demo.add_argument("--config", default="configs/moe/demo.yaml")
    demo.add_argument("--rounds", type=int, default=3)
    demo.add_argument("--iters", type=int, default=30)
    demo.add_argument("--log-interval", type=int, default=5)
    layer = sub.add_parser("layer", help="one MoE layer forward + backward")
    layer.add_argument("--config", default="configs/moe/polynorm.yaml")
    layer.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    layer.add_argument("--seq", type=int, default=4096)
    layer.add_argument("--mbs", type=int, default=2)  # the paper config's micro-batch
    layer.add_argument("--warmup", type=int, default=3)
    layer.add_argument("--iters", type=int, default=10)
    layer.add_argument("overrides", nargs="*", help="config overrides, key=value")
    for p in (demo, layer):
        p.add_argument("--json", default=None, help="write the results as JSON here ('-': stdout)")
    args = parser.parse_args(argv)
    if args.what == "layer":
        bench.require_cuda("bench_moe_experts.py", args.device, "run with --device cpu for a CPU figure")
        out = run_layer(args)
        print(out["shape"])
    else:
        out = run_demo(args)
        print(
            f"largest loss difference, grouped vs sequential, any logged step: {out['max_loss_difference']:.3g}"
        )
    out["meta"] = bench.run_metadata()
    print(bench.metadata_lines(out["meta"]))
    print(out["table"])
    bench.write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
