"""run_pretrain.sh and the SLURM example build the torchrun command for many nodes.

Run as users run them, with the Python interpreter (PYTHON=...) replaced by a recorder that writes
the command line and environment it was given, and SLURM's srun/scontrol replaced by stand-ins on
PATH (srun runs its command once per node with SLURM_NODEID set, as on a 4-node allocation).
"""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOSTS = ["gpu-a01", "gpu-a02", "gpu-a03", "gpu-a04"]


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def fake_tools(tmp: Path) -> dict:
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    record = tmp / "calls.jsonl"
    _script(
        bin_dir / "fake_python",
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"with open({str(record)!r}, 'a') as f:\n"
        "    keys = ('CUDA_DEVICE_MAX_CONNECTIONS', 'OMP_NUM_THREADS', 'PYTHONUNBUFFERED')\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'env': {k: os.environ.get(k) for k in keys}}) + '\\n')\n",
    )
    _script(
        bin_dir / "scontrol",
        "#!/bin/sh\n# scontrol show hostnames LIST\n" + f"printf '%s\\n' {' '.join(HOSTS)}\n",
    )
    _script(
        bin_dir / "srun",
        "#!/usr/bin/env bash\n"
        "while [[ $1 == -* ]]; do shift; done  # options\n"
        'for id in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$id "$@" || exit $?; done\n',
    )
    launcher_vars = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in launcher_vars}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PYTHON=str(bin_dir / "fake_python"))
    return {"env": env, "record": record}


def calls(record: Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()]


def launches(record: Path) -> list[dict]:
    """The launches (the config check, then torchrun from the same process: ``--torchrun``), each
    as {"check": the check's arguments, "torchrun": torchrun's, "env": ...}; the port probe left out."""
    out = []
    for c in calls(record):
        argv = c["argv"]
        if argv[:2] != ["-m", "dense_model.launcher"] or "--torchrun" not in argv:
            continue
        cut = argv.index("--torchrun")
        out.append({"check": argv[2:cut], "torchrun": argv[cut + 1 :], "env": c["env"]})
    return out


def torchrun_options(argv: list[str]) -> dict:
    """{"--nnodes": "4", ...} and the arguments after ``-m dense_model.training.pretrain``."""
    cut = argv.index("dense_model.training.pretrain")
    assert argv[cut - 1] == "-m", argv
    head = argv[: cut - 1]
    options = dict(zip(head[::2], head[1::2]))
    return {"options": options, "args": argv[cut + 1 :]}


def test_multi_node_command_from_environment(tmp_path):
    tools = fake_tools(tmp_path)
    env = {**tools["env"], "NNODES": "4", "NODE_RANK": "2", "MASTER_ADDR": "node0", "GPUS_PER_NODE": "8"}
    proc = subprocess.run(
        ["bash", "run_pretrain.sh", "configs/1b/polynorm.yaml", "training.lr=1e-4", "run_dir=runs/a b"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (call,) = launches(tools["record"])  # one Python: the check, then torchrun
    assert call["check"] == [
        "configs/1b/polynorm.yaml",
        "training.lr=1e-4",
        "run_dir=runs/a b",
        "--world-size",
        "32",
    ]  # fmt: skip (node 2 does not check the run directory: node 0's job may hold it already)
    got = torchrun_options(call["torchrun"])
    assert got["options"] == {
        "--nnodes": "4", "--node_rank": "2", "--nproc_per_node": "8",
        "--master_addr": "node0", "--master_port": "29500",
    }  # fmt: skip
    assert got["args"] == ["configs/1b/polynorm.yaml", "training.lr=1e-4", "run_dir=runs/a b"]
    assert call["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert call["env"]["PYTHONUNBUFFERED"] == "1"
    assert int(call["env"]["OMP_NUM_THREADS"]) >= 1


def test_slurm_variables_and_sbatch_example(tmp_path):
    """The sbatch example on a 4-node allocation: one launcher per node, node ranks 0-3, the first
    host as master, 8 processes each, the config and overrides passed through intact."""
    tools = fake_tools(tmp_path)
    env = {
        **tools["env"],
        "SLURM_NNODES": "4",
        "SLURM_JOB_NODELIST": "gpu-a[01-04]",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_SUBMIT_DIR": str(REPO),
    }
    proc = subprocess.run(
        ["bash", str(REPO / "scripts/slurm/pretrain_4x8.sbatch"), "configs/1b/swiglu.yaml", "data.blend=data/x y.json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    runs = [torchrun_options(c["torchrun"]) for c in launches(tools["record"])]
    assert [r["options"]["--node_rank"] for r in runs] == ["0", "1", "2", "3"]
    for r in runs:
        assert r["options"]["--nnodes"] == "4"
        assert r["options"]["--nproc_per_node"] == "8"
        assert r["options"]["--master_addr"] == HOSTS[0]
        assert r["args"] == ["configs/1b/swiglu.yaml", "data.blend=data/x y.json"]


def test_missing_config_is_a_clear_error(tmp_path):
    tools = fake_tools(tmp_path)
    proc = subprocess.run(
        ["bash", "run_pretrain.sh", "configs/1b/nope.yaml"],
        cwd=REPO, env=tools["env"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "config file 'configs/1b/nope.yaml' not found" in proc.stderr
    assert not tools["record"].exists()  # nothing was launched


def real_launcher_env() -> dict:
    from dense_model.testing import free_port

    launcher_vars = ("NNODES", "NODE_RANK", "MASTER_ADDR", "GPUS_PER_NODE")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in launcher_vars}
    return {**env, "PYTHON": sys.executable, "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO)}


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.activation=polynrom", "config error: model.activation: unknown activation 'polynrom'"),
        ("training.train_iters=12", "config error: the learning-rate warm-up (15 steps,"),  # demo: 15
        ("data.split=a,b,c", "config error: data.split='a,b,c' is not a list of numbers"),
        # The vocabulary is the tokenizer's: a smaller one would fail only in the embedding, after launch.
        (
            "model.vocab_size=10",
            "config error: model.vocab_size=10 is below the 4096 tokens of the demo's tokenizer",
        ),
        # The demo does not silently replace the user's data: one line naming both fields.
        (
            "data.blend=/nonexistent/blend.json",
            "config error: data.demo=true trains on the demo sample, but data.blend is also set; "
            "set data.demo=false to train on your data",
        ),
        (
            "data.paths=[/data/x_text_document]",
            "config error: data.demo=true trains on the demo sample, but data.paths",
        ),
    ],
)
def test_config_error_is_one_line_and_starts_nothing(override, message):
    """The real launcher on the demo config: the check runs before torchrun, which never starts."""
    proc = subprocess.run(
        ["bash", "run_pretrain.sh", override], cwd=REPO, env=real_launcher_env(),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""  # the torchrun command is printed only when it is about to run
    (line,) = proc.stderr.splitlines()
    assert line.startswith(message), line


def test_dry_run_describes_the_job_and_starts_nothing():
    from dense_model.config import load_config
    from dense_model.model import count_parameters

    env = {**real_launcher_env(), "GPUS_PER_NODE": "2"}
    proc = subprocess.run(
        ["bash", "run_pretrain.sh", "configs/demo.yaml", "--dry-run", "parallel.tensor_model_parallel_size=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(REPO / "configs/demo.yaml", ["parallel.tensor_model_parallel_size=2"])
    assert cfg.model.vocab_size is None  # unset: the demo tokenizer's 4096 (tests/data/test_demo.py)
    cfg.model.vocab_size = 4096
    params = count_parameters(cfg.model)["total"]
    *resolved, layout, command = proc.stdout.strip().splitlines()
    assert "  tensor_model_parallel_size: 2" in resolved and "run_dir: runs/demo" in resolved
    assert "  vocab_size: 4096" in resolved  # resolved from the tokenizer, as the trainer saves it
    assert layout.startswith("world 2 = TP 2 x PP 1 x DP 1 | micro-batches per step 2 of 8 per DP rank")
    assert "| 2,048 tokens per step | 150 steps (15 warm-up), 307,200 tokens |" in layout
    assert f"| {params:,} parameters" in layout
    assert "-m torch.distributed.run" in command and "--nproc_per_node 2" in command
    assert not (REPO / "runs/demo/job.lock").exists()


@pytest.mark.slow  # run_pretrain.sh twice, the demo's data built first (~20 s of CPU)
def test_a_split_that_empties_a_datasets_part_is_refused_before_anything_is_written(tmp_path):
    """``data.split=969,30,1`` on the demo (63 documents in its smallest subset: the test part is
    documents 63..63) and the demo's blend trained as an import with the default split: one line,
    exit 2, the run directory not created, torchrun never started. The demo's data is not built yet
    (a fresh cache): the check tokenises it first, as the job would, and it stays cached."""
    from dense_model.data.blend import load_blend
    from dense_model.procutil import kill_process_tree

    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    env = {**real_launcher_env(), "DENSE_MODEL_CACHE": str(cache)}
    demo_data = cache / "demo_data"
    imported = [  # data.split as schema.py's default (an import's config does not set it)
        "data.demo=false", f"data.blend={demo_data}/redpajama_sample_blend.json",
        f"data.tokenizer_model={demo_data}/demo_tokenizer.model", "data.split=969,30,1",
    ]  # fmt: skip
    for overrides in (["data.split=969,30,1"], imported):
        proc = subprocess.Popen(
            ["bash", "run_pretrain.sh", "configs/demo.yaml", f"run_dir={run_dir}", *overrides],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            out, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:  # the check let the job start: no training left behind
            kill_process_tree(proc.pid)
            raise
        assert proc.returncode == 2, err
        assert out == ""  # the torchrun command is printed only when it is about to run
        (line,) = err.splitlines()
        assert line.startswith("config error: dataset ") and "_text_document has 63 documents: " in line, line
        assert "data.split='969,30,1' leaves its test part empty (documents 63..63)" in line, line
        assert not run_dir.exists()
    # The demo's data stays cached for the job.
    assert len(load_blend(str(demo_data / "redpajama_sample_blend.json"))[0]) > 1
