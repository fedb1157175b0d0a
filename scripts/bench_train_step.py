"""Training-step throughput of the 1B model on one GPU: PolyNorm against SwiGLU, fused kernels on and off.

Each run builds the model from the config (``dense_model.config.load_config`` +
``dense_model.model.build_model``) and wraps it as the trainer does (``dense_model.training.optim``:
megatron-core DistributedDataParallel, the megatron optimizer: AdamW with fp32 master weights, the
distributed optimizer and grad clipping as configured), then times full optimizer steps (one
micro-batch of synthetic tokens) after a few warmup steps: the trainer's own step (the
forward/backward of ``dense_model.training.step``, the optimizer step, the LR scheduler step), one
run after another, each in its own child process (--no-isolate: all in this one):

  swiglu                    (no fused kernel)
  polynorm  fused on        (model.fused_activation=true: the Triton kernels)
  polynorm  fused off       (model.fused_activation=false: the torch reference)

It reports tokens/s, step time, MFU and peak memory, and each run's step time against swiglu's.
A run that does not fit is reported as OOM; with ``--fit-layers`` the layer count is halved until
the run fits and the table says how many layers ran.

MFU = tokens/s x FLOPs per token / peak FLOP/s. FLOPs per token come from the trainer's
``dense_model.training.metrics.flops_per_token`` (3 x forward matmul FLOPs including the logits,
plus 12 x layers x hidden x seq for attention scores and values, not halved for the causal mask);
elementwise work (norms, activations) is not counted, so a parameter-matched PolyNorm and SwiGLU
have the same FLOPs per token. Peak FLOP/s: --peak-tflops, else training.peak_flops from the
config, else the dense bf16 peak of the GPU model (``dense_model.training.metrics.PEAK_BF16_FLOPS``).

    python scripts/bench_train_step.py                                    # 1B defaults, seq 4096, mbs 2
    python scripts/bench_train_step.py --config configs/1b/polynorm.yaml --json step.json
    python scripts/bench_train_step.py --runs polynorm:on,polynorm:off    # a subset
    python scripts/bench_train_step.py --runs polynorm:on --attention local,sdpa   # attention backends
    python scripts/bench_train_step.py --device cpu                       # smoke run: tiny model, no timings

Extra ``key=value`` arguments are config overrides applied to every run (e.g.
``model.transformer_impl=transformer_engine``; that is the default here when Transformer Engine
imports, for its flash attention).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dense_model.benchmarking import (  # noqa: E402
    fmt,
    markdown_table,
    metadata_lines,
    require_cuda,
    run_isolated,
    run_metadata,
    write_json,
)
from dense_model.config import load_config  # noqa: E402
from dense_model.model import installed_kernels  # noqa: E402
from dense_model.parallel import initialize_parallel  # noqa: E402
from dense_model.testing import tiny_model_overrides  # noqa: E402
from dense_model.training.metrics import flops_per_token, peak_flops  # noqa: E402
from dense_model.training.optim import build_scheduler, build_training_model  # noqa: E402
from dense_model.training.step import forward_backward  # noqa: E402

# Benchmarks run without a tokenizer: the 1B model's vocabulary (the Llama tokenizer's) unless an
# override sets model.vocab_size (a config's tokenizer is not loaded).
GPU_OVERRIDES = ["model.vocab_size=32000"]
CPU_SMOKE_OVERRIDES = [*tiny_model_overrides(seq=32), "training.micro_batch_size=2", "training.bf16=false"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default=None, help="YAML config (default: the built-in 1B defaults)")
    p.add_argument(
        "--runs",
        default="swiglu:na,polynorm:on,polynorm:off",
        help="comma-separated ACTIVATION:FUSED with FUSED in on/off/na (default: %(default)s)",
    )
    p.add_argument(
        "--attention",
        default="auto",
        help="comma-separated model.attention_backend values; every run once per backend (default: auto)",
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per run")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--num-layers", type=int, default=None, help="override model.num_layers")
    p.add_argument("--fit-layers", action="store_true", help="on OOM, halve the layers and retry")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: smoke run of a tiny model")
    p.add_argument("--json", default=None, metavar="PATH", help="write results as JSON ('-' for stdout)")
    p.add_argument(
        "--no-isolate",
        dest="isolate",
        action="store_false",
        help="run everything in this process (default: one child process per run, so peak memory, "
        "allocator state and an OOM of one run do not leak into the next)",
    )
    p.add_argument("overrides", nargs="*", help="config overrides key=value, applied to every run")
    return p.parse_args(argv)


def synthetic_batch(cfg, device):
    b, s = cfg.training.micro_batch_size, cfg.model.seq_length
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (b, s + 1), generator=gen)  # [b, s + 1]
    return {
        "tokens": tokens[:, :-1].contiguous().to(device),
        "labels": tokens[:, 1:].contiguous().to(device),
        "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous().to(device),
        "loss_mask": torch.ones(b, s, device=device),
    }


def run_one(args, cfg) -> dict:
    """Warmup + timed steps of the trainer's step on one micro-batch; losses, times, peak memory."""
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, ddp, optimizer = build_training_model(cfg)  # exactly the trainer's model, DDP and optimizer
    scheduler = build_scheduler(optimizer, cfg)
    batch = synthetic_batch(cfg, args.device)
    mbs, seq = cfg.training.micro_batch_size, cfg.model.seq_length
    losses, times = [], []
    for step in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        ddp.zero_grad_buffer()  # as Trainer.train_step
        optimizer.zero_grad()
        reduced = forward_backward([ddp], iter([batch]), 1, seq, mbs)
        applied, _, _ = optimizer.step()
        if applied:
            scheduler.step(1)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        loss_sum, tokens = reduced[0]["lm loss"].tolist()
        losses.append(loss_sum / tokens)
    result = {
        "num_layers": cfg.model.num_layers,
        "attention": type(model.decoder.layers[0].self_attention.core_attention).__name__,
        "flops_per_token": flops_per_token(cfg),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }
    if cuda:
        step_s = statistics.median(times)
        result.update(
            step_ms=1e3 * step_s,
            step_ms_all=[1e3 * t for t in times],
            tokens_per_s=mbs * seq / step_s,
            peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30,
        )
    del model, ddp, optimizer, scheduler, batch
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def parse_runs(args) -> list[tuple[str, str, str]]:
    """(activation, fused, attention backend) per run."""
    runs = []
    for item in args.runs.split(","):
        act, _, fused = item.partition(":")
        fused = fused or "na"
        if fused not in ("on", "off", "na"):
            raise SystemExit(f"--runs: {item!r}: FUSED must be on, off or na")
        runs += [(act, fused, attention) for attention in args.attention.split(",")]
    return runs


def main(argv=None) -> int:
    args = parse_args(argv)
    require_cuda(
        "bench_train_step",
        args.device,
        "this benchmark needs a GPU (H100/H200); --device cpu runs a tiny model",
    )
    runs = parse_runs(args)
    if args.isolate and len(runs) > 1:
        argv = sys.argv[1:] if argv is None else argv
        outcomes = run_isolated(
            __file__, argv, [["--runs", f"{a}:{f}", "--attention", b] for a, f, b in runs]
        )
        meta = next((o["meta"] for o in outcomes if isinstance(o, dict)), run_metadata())
        meta["command"] = run_metadata()["command"]
        results = []
        for (act, fused, attention), outcome in zip(runs, outcomes):
            failed = {"activation": act, "fused": fused, "attention_backend": attention, "status": outcome}
            results += outcome["results"] if isinstance(outcome, dict) else [failed]
    else:
        meta, results = run_in_process(args, runs)
    reference = next((r for r in results if r["activation"] == "swiglu" and r.get("step_ms")), None)
    for r in results:
        if reference and r.get("step_ms") and r["num_layers"] == reference["num_layers"]:
            r["step_time_vs_swiglu"] = r["step_ms"] / reference["step_ms"]
            r["peak_mem_vs_swiglu"] = r["peak_mem_gib"] / reference["peak_mem_gib"]
    print(markdown(meta, results))
    write_json(args.json, {"meta": meta, "results": results})
    return 0


def run_in_process(args, runs):
    base = CPU_SMOKE_OVERRIDES.copy() if args.device == "cpu" else GPU_OVERRIDES.copy()
    if args.device == "cuda" and installed_kernels().transformer_engine:
        base.append("model.transformer_impl=transformer_engine")
    base += list(args.overrides)
    if args.num_layers:
        base.append(f"model.num_layers={args.num_layers}")

    first = load_config(args.config, base)
    initialize_parallel(1, 1, seed=first.training.seed)
    if args.peak_tflops:
        first.training.peak_flops = args.peak_tflops * 1e12
    peak = peak_flops(first)
    meta = run_metadata(
        config=args.config or "(built-in defaults)",
        overrides=base,
        peak_flops=peak,
        seq_length=first.model.seq_length,
        micro_batch_size=first.training.micro_batch_size,
        transformer_impl=first.model.transformer_impl,
        recompute=first.training.recompute_granularity,
        bf16=first.training.bf16 and args.device == "cuda",
    )
    results = []
    for act, fused, attention in runs:
        overrides = [*base, f"model.activation={act}", f"model.attention_backend={attention}"]
        if fused != "na":
            overrides.append(f"model.fused_activation={'true' if fused == 'on' else 'false'}")
        cfg = load_config(args.config, overrides)
        row = {"activation": act, "fused": fused, "attention_backend": attention}
        while True:
            try:
                row.update(run_one(args, cfg), status="ok")
                break
            except torch.cuda.OutOfMemoryError:
                gc.collect()
                torch.cuda.empty_cache()
                row.update(status=f"OOM at {cfg.model.num_layers} layers")
                if not args.fit_layers or cfg.model.num_layers <= 1:
                    break
                cfg = load_config(args.config, [*overrides, f"model.num_layers={cfg.model.num_layers // 2}"])
        if row.get("tokens_per_s") and peak:
            row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / peak
        results.append(row)
        print(f"# {act} fused={fused} attention={attention}: {row}", file=sys.stderr, flush=True)
    return meta, results


def markdown(meta, results) -> str:
    peak = meta.get("peak_flops")
    header = [
        metadata_lines(meta),
        f"Config: {meta.get('config')}; seq {meta.get('seq_length')}, micro-batch {meta.get('micro_batch_size')}, "
        f"{meta.get('transformer_impl')}, recompute {meta.get('recompute')}, bf16 {meta.get('bf16')}; "
        f"peak {fmt(peak and peak / 1e12, '.1f')} TFLOP/s",
        "",
    ]
    columns = ["activation", "fused", "attention", "layers", "tokens/s", "step ms", "MFU %", "peak GiB"]
    columns += ["time vs swiglu", "mem vs swiglu", "loss first -> last", "status"]
    rows = []
    for r in results:
        mfu = r.get("mfu")
        loss = f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}" if "loss_first" in r else "n/a"
        attention = (
            f"{r['attention_backend']} ({r['attention']})" if "attention" in r else r["attention_backend"]
        )
        rows.append(
            [r["activation"], r["fused"], attention, r.get("num_layers", "n/a"), fmt(r.get("tokens_per_s"), ".0f"),
             fmt(r.get("step_ms"), ".1f"), fmt(mfu and 100 * mfu, ".1f"), fmt(r.get("peak_mem_gib"), ".2f"),
             fmt(r.get("step_time_vs_swiglu"), ".3f"), fmt(r.get("peak_mem_vs_swiglu"), ".3f"), loss, r["status"]]
        )  # fmt: skip
    return "\n".join(header) + markdown_table(columns, rows)


if __name__ == "__main__":
    sys.exit(main())
