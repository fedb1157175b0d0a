"""Are CPU training runs reproducible to the bit? Launch the same job N times and compare.

    python scripts/check_reproducible.py --runs 10 --steps 40 --dir /tmp/repro
    python scripts/check_reproducible.py --runs 4 --env MKL_CBWR=AUTO -- model.activation=swiglu

Each run is ``bash run_pretrain.sh [CONFIG] training.train_iters=STEPS logging.log_interval=1
run_dir=DIR/run-K [OVERRIDES...]`` in a fresh process (the demo config unless --config), one after
the other, each with this process's environment plus ``--env`` settings. Every step's loss and
grad norm are read back from each run's metrics.jsonl (JSON keeps a float's exact value) and
compared with run 1's, bit for bit. Prints one line per run and the first difference; exits 1 if any
run differs from run 1 (or a run fails), 0 if all are identical, 2 on bad arguments.

Run it on a machine with other work going on: a difference that depends on load (thread counts,
memory placement) shows only then.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KEYS = ("loss", "grad_norm")


def read_steps(run_dir: Path) -> dict[int, tuple[float, ...]]:
    """step -> (loss, grad norm) from run_dir/metrics.jsonl (the last record of a step wins)."""
    steps = {}
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                steps[record["step"]] = tuple(record[k] for k in KEYS)
    return steps


def first_difference(reference: dict, other: dict) -> str | None:
    """The first step at which ``other`` differs from ``reference`` (or lacks/has extra steps)."""
    if sorted(reference) != sorted(other):
        return f"steps {sorted(reference)} against {sorted(other)}"
    for step in sorted(reference):
        for key, a, b in zip(KEYS, reference[step], other[step]):
            if a != b:
                return f"step {step}: {key} {a!r} against {b!r} (difference {b - a:.3g})"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="how many runs (at least 2)")
    parser.add_argument("--steps", type=int, default=40, help="training.train_iters of each run")
    parser.add_argument(
        "--dir", default="/tmp/check_reproducible", help="folder for the runs (must be empty or absent)"
    )
    parser.add_argument(
        "--config", default=str(REPO / "configs/demo.yaml"), help="training config (the demo's by default)"
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="set in each run's environment"
    )
    parser.add_argument(
        "overrides", nargs="*", help="more config overrides (key=value), the same for every run"
    )
    args = parser.parse_args(argv)
    out = Path(args.dir)
    if args.runs < 2:
        print(f"check_reproducible: --runs {args.runs}: compare at least 2 runs", file=sys.stderr)
        return 2
    if out.exists() and any(out.iterdir()):
        print(f"check_reproducible: --dir {out} is not empty: name a new folder or empty it", file=sys.stderr)
        return 2
    if not Path(args.config).is_file():
        print(f"check_reproducible: --config {args.config} not found (see configs/)", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHON=os.environ.get("PYTHON", sys.executable))
    for setting in args.env:
        name, sep, value = setting.partition("=")
        if not sep or not name:
            print(f"check_reproducible: --env {setting!r}: write NAME=VALUE", file=sys.stderr)
            return 2
        env[name] = value
    out.mkdir(parents=True, exist_ok=True)

    reference, differing = None, 0
    for k in range(1, args.runs + 1):
        run_dir = out / f"run-{k}"
        cmd = [
            "bash",
            str(REPO / "run_pretrain.sh"),
            args.config,
            f"training.train_iters={args.steps}",
            "logging.log_interval=1",
            f"run_dir={run_dir}",
            *args.overrides,
        ]
        start = time.monotonic()
        with open(out / f"run-{k}.log", "w") as log:
            code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
        took = time.monotonic() - start
        if code != 0:
            print(f"run {k}: exit {code} after {took:.0f} s, see {out}/run-{k}.log")
            return 1
        steps = read_steps(run_dir)
        if reference is None:
            reference = steps
            last = steps[max(steps)]
            print(
                f"run {k}: {len(steps)} steps in {took:.0f} s, last loss {last[0]!r} grad norm {last[1]!r}",
                flush=True,
            )
            continue
        diff = first_difference(reference, steps)
        differing += diff is not None
        print(
            f"run {k}: {took:.0f} s, " + (f"differs from run 1 at {diff}" if diff else "identical to run 1"),
            flush=True,
        )
    print(
        f"{args.runs - differing} of {args.runs} runs identical to run 1 ({args.steps} steps, loss and grad norm)"
    )
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
