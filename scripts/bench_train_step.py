"""Training-step throughput of the 1B model on one GPU: PolyNorm against SwiGLU, fused kernels on and off.

Each run builds the model from the config (``dense_model.config.load_config`` +
``dense_model.model.build_model``) and wraps it as the trainer does (``dense_model.training.optim``:
megatron-core DistributedDataParallel, the megatron optimizer: AdamW with fp32 master weights, the
distributed optimizer and grad clipping as configured), then times full optimizer steps (one
micro-batch of synthetic tokens: forward, backward, optimizer) after a few warmup steps, one run
after another, each in its own child process (--no-isolate: all in this one):

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
    python scripts/bench_train_step.py --device cpu                       # smoke run: tiny model, no timings

Extra ``key=value`` arguments are config overrides applied to every run (e.g.
``model.transformer_impl=transformer_engine``; that is the default here when Transformer Engine
imports, for its flash attention).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

CPU_SMOKE_OVERRIDES = [  # after dense_model.testing.tiny_model_overrides(seq=32)
    "training.micro_batch_size=2",
    "training.bf16=false",
]


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


# ----------------------------------------------------------------------------------------------


def init_parallel(cfg):
    from dense_model.parallel import initialize_parallel

    initialize_parallel(1, 1, seed=cfg.training.seed)


def synthetic_batch(cfg, device):
    b, s = cfg.training.micro_batch_size, cfg.model.seq_length
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (b, s + 1), generator=gen)
    return {
        "tokens": tokens[:, :-1].contiguous().to(device),
        "labels": tokens[:, 1:].contiguous().to(device),
        "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous().to(device),
        "loss_mask": torch.ones(b, s, device=device),
    }


def run_one(args, cfg, device) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from dense_model.training.metrics import flops_per_token
    from dense_model.training.optim import build_training_model
    from dense_model.training.step import forward_step

    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _, ddp, optimizer = build_training_model(cfg)  # exactly the trainer's model, DDP and optimizer
    model = [ddp]
    fpt = flops_per_token(cfg)
    batch = synthetic_batch(cfg, device)
    forward_backward = get_forward_backward_func()
    losses, times = [], []
    for step in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter([batch]),
            model=model,
            num_microbatches=1,
            seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.training.micro_batch_size,
            forward_only=False,
        )
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        loss_sum, tokens = reduced[0]["lm loss"].tolist()
        losses.append(loss_sum / tokens)
    result = {
        "num_layers": cfg.model.num_layers,
        "flops_per_token": fpt,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }
    if cuda:
        step_s = statistics.median(times)
        tokens = cfg.training.micro_batch_size * cfg.model.seq_length
        result.update(
            step_ms=1e3 * step_s,
            step_ms_all=[1e3 * t for t in times],
            tokens_per_s=tokens / step_s,
            peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30,
        )
    del model, optimizer, batch
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def parse_runs(spec: str) -> list[tuple[str, str]]:
    runs = []
    for item in spec.split(","):
        act, _, fused = item.partition(":")
        fused = fused or "na"
        if fused not in ("on", "off", "na"):
            raise SystemExit(f"--runs: {item!r}: FUSED must be on, off or na")
        runs.append((act, fused))
    return runs


def main(argv=None) -> int:
    args = parse_args(argv)
    global torch
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench_train_step: no CUDA device here; this benchmark needs a GPU (H100/H200). "
            "--device cpu runs a tiny model as a smoke test (no timings).",
            file=sys.stderr,
        )
        return 2
    runs = parse_runs(args.runs)
    if args.isolate and len(runs) > 1:
        meta, results = run_isolated(args, runs, argv if argv is not None else sys.argv[1:])
    else:
        meta, results = run_in_process(args, runs)
    reference = next((r for r in results if r["activation"] == "swiglu" and r.get("step_ms")), None)
    for r in results:
        if reference and r.get("step_ms") and r["num_layers"] == reference["num_layers"]:
            r["step_time_vs_swiglu"] = r["step_ms"] / reference["step_ms"]
            r["peak_mem_vs_swiglu"] = r["peak_mem_gib"] / reference["peak_mem_gib"]
    print(markdown(meta, results))
    if args.json:
        blob = json.dumps({"meta": meta, "results": results}, indent=2)
        if args.json == "-":
            print(blob)
        else:
            with open(args.json, "w") as f:
                f.write(blob + "\n")
    return 0


def run_isolated(args, runs, argv):
    """Each run in a child process running this script with --no-isolate --runs RUN."""
    import subprocess
    import tempfile

    passthrough = []  # argv minus --runs/--json (their values too)
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        if item in ("--runs", "--json"):
            skip = True
            continue
        if item.startswith(("--runs=", "--json=")):
            continue
        passthrough.append(item)
    meta, results = None, []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (act, fused) in enumerate(runs):
            out = os.path.join(tmp, f"run{i}.json")
            cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--no-isolate"]
            cmd += ["--runs", f"{act}:{fused}", "--json", out]
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode == 0 and os.path.exists(out):
                with open(out) as f:
                    blob = json.load(f)
                meta = meta or blob["meta"]
                results.extend(blob["results"])
            else:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                results.append(
                    {"activation": act, "fused": fused, "status": f"failed (rc {proc.returncode}): {tail}"}
                )
                print(proc.stderr[-4000:], file=sys.stderr)
    if meta is None:
        meta = {"device": "?", "torch": torch.__version__, "date_utc": "?", "config": args.config}
    meta["command"] = " ".join([os.path.basename(sys.executable), *sys.argv])
    return meta, results


def run_in_process(args, runs):
    from dense_model.config import load_config

    if args.device == "cpu":
        from dense_model.testing import tiny_model_overrides

        base = [*tiny_model_overrides(seq=32), *CPU_SMOKE_OVERRIDES]
    else:
        base = []
    if args.device == "cuda":
        try:
            import transformer_engine  # noqa: F401

            base.append("model.transformer_impl=transformer_engine")
        except ImportError:
            pass
    base += list(args.overrides)
    if args.num_layers:
        base.append(f"model.num_layers={args.num_layers}")

    first = load_config(args.config, base)
    init_parallel(first)
    if args.peak_tflops:
        first.training.peak_flops = args.peak_tflops * 1e12
    from dense_model.training.metrics import peak_flops

    peak = peak_flops(first)
    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (smoke run)",
        "torch": torch.__version__,
        "config": args.config or "(built-in defaults)",
        "overrides": base,
        "peak_flops": peak,
        "seq_length": first.model.seq_length,
        "micro_batch_size": first.training.micro_batch_size,
        "transformer_impl": first.model.transformer_impl,
        "recompute": first.training.recompute_granularity,
        "bf16": first.training.bf16 and args.device == "cuda",
    }
    results = []
    for act, fused in runs:
        overrides = [*base, f"model.activation={act}"]
        if fused != "na":
            overrides.append(f"model.fused_activation={'true' if fused == 'on' else 'false'}")
        cfg = load_config(args.config, overrides)
        row = {"activation": act, "fused": fused}
        while True:
            try:
                row.update(run_one(args, cfg, args.device), status="ok")
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
        print(f"# {act} fused={fused}: {row}", file=sys.stderr, flush=True)
    return meta, results


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def markdown(meta, results) -> str:
    keys = ("device", "torch", "date_utc", "command", "config", "seq_length", "micro_batch_size")
    keys += ("transformer_impl", "recompute", "bf16")
    meta = {**{k: meta.get(k, "?") for k in keys}, "peak_flops": meta.get("peak_flops")}
    lines = [
        f"Device: {meta['device']}; torch {meta['torch']}; {meta['date_utc']}",
        f"Command: `{meta['command']}`",
        f"Config: {meta['config']}; seq {meta['seq_length']}, micro-batch {meta['micro_batch_size']}, "
        f"{meta['transformer_impl']}, recompute {meta['recompute']}, bf16 {meta['bf16']}; "
        f"peak {fmt(meta['peak_flops'] and meta['peak_flops'] / 1e12, '.1f')} TFLOP/s",
        "",
        "| activation | fused | layers | tokens/s | step ms | MFU % | peak GiB | time vs swiglu | mem vs swiglu | loss first -> last | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mfu = r.get("mfu")
        loss = f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}" if "loss_first" in r else "n/a"
        lines.append(
            f"| {r['activation']} | {r['fused']} | {r.get('num_layers', 'n/a')} | {fmt(r.get('tokens_per_s'), '.0f')} | "
            f"{fmt(r.get('step_ms'), '.1f')} | {fmt(mfu and 100 * mfu, '.1f')} | {fmt(r.get('peak_mem_gib'), '.2f')} | "
            f"{fmt(r.get('step_time_vs_swiglu'), '.3f')} | {fmt(r.get('peak_mem_vs_swiglu'), '.3f')} | {loss} | {r['status']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
