"""What ``model.qk_norm=full`` (OLMoE's full-width QK-norm, dense_model/qk_norm.py) adds to a training
step: the CPU MoE demo (configs/moe/demo.yaml) by default, with qk_norm none, full (and per_head).

The runs are built in this one process and stepped alternately (none, full, none, full, ...: the
protocol of ``scripts/bench_train_step.py``, whose ``Run`` does the trainer's own step: forward,
backward, optimizer, scheduler), so drift and other load on the machine hit every run alike. Reported:
each run's median step and inter-quartile range, and the median of the per-round ratios
(full's step / none's step in the same round) with its quartiles.

    python scripts/bench_qk_norm.py                              # CPU, MoE demo, 20 timed steps each
    python scripts/bench_qk_norm.py --runs none,full,per_head --steps 40 --json qk.json
    python scripts/bench_qk_norm.py --config configs/1b/polynorm.yaml --device cuda model.num_layers=4

``--key`` compares the values of another config field the same way, e.g. the MoE experts' activation
coefficients, one set per layer against one per expert:

    python scripts/bench_qk_norm.py --key model.moe.activation_params --runs per_expert,shared

Several keys at once (comma-separated; each run's values joined by '+', in the keys' order), e.g. the
seed's combination against the earlier default:

    python scripts/bench_qk_norm.py --key model.qk_norm,model.moe.activation_params \
        --runs none+per_expert,full+shared
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_train_step, beside this file

from bench_train_step import run_interleaved, step_stats  # noqa: E402

from dense_model.benchmarking import fmt, markdown_table, metadata_lines, run_metadata, write_json  # noqa: E402
from dense_model.config import load_config  # noqa: E402
from dense_model.parallel import initialize_parallel  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/moe/demo.yaml", help="YAML config (default: %(default)s)")
    p.add_argument(
        "--key",
        default="model.qk_norm",
        help="the config field compared, or several comma-separated (default: %(default)s)",
    )
    p.add_argument(
        "--runs", default="none,full", help="comma-separated values of --key; the first is the baseline"
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per run")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run (alternating)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", default=None, metavar="PATH", help="write results as JSON ('-' for stdout)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, applied to every run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    names = args.runs.split(",")
    # no tokenizer is loaded: the demo's vocabulary (4096) unless an override sets model.vocab_size
    base = [
        "model.vocab_size=4096",
        *([] if args.device == "cuda" else ["training.bf16=false"]),
        *args.overrides,
    ]
    keys = args.key.split(",")
    cfgs = []
    for name in names:
        values = name.split("+")
        if len(values) != len(keys):
            print(
                f"bench_qk_norm: run {name!r} has {len(values)} values for {len(keys)} keys", file=sys.stderr
            )
            return 2
        cfgs.append(load_config(args.config, [*base, *(f"{k}={v}" for k, v in zip(keys, values))]))
    initialize_parallel(1, 1, seed=cfgs[0].training.seed)
    args.dp_size = 1
    runs, _ = run_interleaved(args, cfgs)
    baseline = runs[0].step_ms
    meta = run_metadata(config=args.config, overrides=base, steps=args.steps, key=args.key)
    rows, blob = [], {"meta": meta, "runs": {}}
    for name, run in zip(names, runs):
        ratios = [t / b for t, b in zip(run.step_ms, baseline)]
        q1, med, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        stats = step_stats(run.step_ms)
        blob["runs"][name] = {"step_ms": stats, "ratio_to_first": {"q1": q1, "median": med, "q3": q3}}
        rows.append(
            [name, fmt(stats["median"], ".1f"), fmt(stats["iqr"], ".1f"), f"{med:.3f} [{q1:.3f}, {q3:.3f}]"]
        )
        run.free()
    print(metadata_lines(blob["meta"]))
    print(
        markdown_table([args.key, "median step (ms)", "IQR (ms)", f"step / {names[0]}'s, same round"], rows)
    )
    write_json(args.json, blob)
    return 0


if __name__ == "__main__":
    sys.exit(main())
