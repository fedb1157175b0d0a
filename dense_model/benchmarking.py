"""What the benchmark scripts (``scripts/bench_*.py``) share, so each keeps only its measurement:
the run's metadata, number formatting, Markdown tables, JSON output, the "needs CUDA" exit and
isolated runs (each run in a child process of the same script).

    meta = run_metadata(dtype="bf16")                       # machine, date, versions, command
    print(markdown_table(["run", "ms"], [["a", fmt(1.5, ".2f")]]))
    write_json(args.json, {"meta": meta, "results": rows})
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

# torch is imported where it is used: gpu_check.py --cpu records its metadata without it (a torch
# import is ~2.5 s of CPU, and the check's orchestrator never runs a model itself).


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_metadata(cpu_only: bool = False, **extra) -> dict:
    """Where, when and how a benchmark ran: device (the GPU's name, else the CPU's), cores, date
    (UTC), Python, torch, megatron-core and Triton versions, the command line; plus ``extra``.
    ``cpu_only``: the run uses no GPU; torch is not imported (its version from the package's metadata)."""
    if cpu_only:
        device, torch_version = f"cpu ({cpu_name()})", _version("torch")
    else:
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({cpu_name()})"
        torch_version = torch.__version__
    return {
        "device": device,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch_version,
        "megatron_core": _version("megatron-core"),
        "triton": _version("triton"),
        "command": " ".join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        **extra,
    }


def metadata_lines(meta: dict) -> str:
    """The metadata as the two lines a table in docs/benchmarks.md starts with."""
    return (
        f"Device: {meta['device']}, {meta['cores']} cores; Python {meta['python']}, torch {meta['torch']}, "
        f"megatron-core {meta['megatron_core']}, triton {meta['triton']}; {meta['date_utc']}\n"
        f"Command: `{meta['command']}`"
    )


def fmt(value, spec: str) -> str:
    """``format(value, spec)``, or "n/a" for a value that was not measured (None)."""
    return "n/a" if value is None else format(value, spec)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; cells are written with ``str``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | None, blob: dict) -> None:
    """Write ``blob`` as indented JSON to ``path`` ('-': stdout; None: nowhere)."""
    if path is None:
        return
    text = json.dumps(blob, indent=2)
    if path == "-":
        print(text)
    else:
        Path(path).write_text(text + "\n")


def kernel_bench_parser(doc: str, cpu_help: str) -> argparse.ArgumentParser:
    """The argument parser of a kernel benchmark: its docstring's first paragraph as the description,
    ``--device cuda|cpu`` (``cpu_help``: what a CPU run is)."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help=cpu_help)
    return p


def kernel_bench_device(script: str, device: str) -> bool:
    """A Triton kernel benchmark's ``--device``: on the CPU a smoke run under Triton's interpreter
    (switched on here, before Triton and the kernels are imported); ``cuda`` needs a GPU. True on the CPU."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    require_cuda(
        script,
        device,
        "the numbers this script exists for need an H100/H200; --device cpu is a smoke run (tiny shapes, "
        "Triton interpreter, no timings)",
    )
    return device == "cpu"


def require_cuda(script: str, device: str, hint: str) -> None:
    """Exit with status 2 and one line on stderr when ``device`` is cuda and there is no GPU."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print(f"{script}: no CUDA device here; {hint}", file=sys.stderr)
        raise SystemExit(2)


def run_isolated(script: str, argv: list[str], runs: list[list[str]]) -> list[dict | str]:
    """Run ``script`` once per entry of ``runs``, each in a child process, and collect the JSON
    each child writes.

    A child gets this process's ``argv`` followed by the run's own options, ``--no-isolate`` and
    ``--json FILE``: argparse keeps the last value of an option given twice, so the run's options
    replace the parent's. Returns per run the child's JSON, or a one-line failure (its exit status
    and the last line of its stderr, which is echoed here).
    """
    outcomes: list[dict | str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, run in enumerate(runs):
            out = Path(tmp, f"run{i}.json")
            cmd = [sys.executable, script, *argv, *run, "--no-isolate", "--json", str(out)]
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode == 0 and out.exists():
                outcomes.append(json.loads(out.read_text()))
            else:
                print(proc.stderr[-4000:], file=sys.stderr)
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                outcomes.append(f"failed (rc {proc.returncode}): {tail}")
    return outcomes
