"""dense_model.benchmarking, the benchmark scripts' shared helper: tables, JSON, the CUDA exit and
isolated runs (real child processes of a small argparse script)."""

import json
import textwrap

import pytest

from dense_model.benchmarking import fmt, markdown_table, require_cuda, run_isolated, run_metadata, write_json


def test_markdown_table_and_fmt():
    table = markdown_table(["run", "ms"], [["a", fmt(1.25, ".1f")], ["b", fmt(None, ".1f")]])
    assert table.splitlines() == ["| run | ms |", "|---|---|", "| a | 1.2 |", "| b | n/a |"]


def test_metadata_and_json(tmp_path):
    meta = run_metadata(dtype="bf16")
    assert meta["dtype"] == "bf16" and meta["megatron_core"] and meta["torch"]
    assert meta["command"].startswith("python ")
    write_json(str(tmp_path / "out.json"), {"meta": meta})
    assert json.loads((tmp_path / "out.json").read_text())["meta"] == meta


def test_require_cuda_exits_2_on_a_cpu(capsys):
    require_cuda("bench_x", "cpu", "unused")  # a CPU run needs nothing
    with pytest.raises(SystemExit) as exit_info:
        require_cuda("bench_x", "cuda", "run it on a GPU")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "bench_x: no CUDA device here; run it on a GPU\n"


SCRIPT = textwrap.dedent(
    """
    import argparse, json
    p = argparse.ArgumentParser()
    p.add_argument("--run", default="all")
    p.add_argument("--scale", type=int, default=1)
    p.add_argument("--json")
    p.add_argument("--no-isolate", action="store_true")
    args = p.parse_args()
    if args.run == "bad":
        raise SystemExit("bad run refused")
    with open(args.json, "w") as f:
        json.dump({"run": args.run, "scale": args.scale, "isolated": args.no_isolate}, f)
    """
)


def test_run_isolated_children_get_the_run_options(tmp_path):
    script = tmp_path / "bench_toy.py"
    script.write_text(SCRIPT)
    argv = ["--run", "all", "--scale", "3", "--json", str(tmp_path / "parent.json")]  # the parent's options
    outcomes = run_isolated(str(script), argv, [["--run", "a"], ["--run", "bad"], ["--run", "b"]])
    assert outcomes[0] == {"run": "a", "scale": 3, "isolated": True}
    assert outcomes[1] == "failed (rc 1): bad run refused"
    assert outcomes[2] == {"run": "b", "scale": 3, "isolated": True}
    assert not (tmp_path / "parent.json").exists()
