"""toolkits/studies/run_study.py end to end: a 2 x 2 study trained through run_pretrain.sh, an
interrupted run resumed without redoing the finished one, the report's numbers recomputed from the
runs' metrics with scipy, and the SLURM array path under stand-in sbatch/srun/scontrol."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scipy import stats

from dense_model.procutil import kill_process_tree
from dense_model.testing import offline_env, run_tool

REPO = Path(__file__).resolve().parents[2]
RUN_STUDY = REPO / "toolkits/studies/run_study.py"
TINY = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=2",
    "model.swiglu_ffn_hidden_size=64",
    "training.micro_batch_size=4",
    "training.global_batch_size=4",
    "training.train_iters=4",
    "training.lr_warmup_iters=1",
    "logging.log_interval=2",
    "logging.eval_interval=2",
    "logging.eval_iters=1",
    "checkpoint.save_interval=2",
    "data.num_workers=0",
]


def write_study(path: Path, study_dir: Path, **extra) -> Path:
    study = {
        "name": "tiny",
        "base_config": str(REPO / "configs/demo.yaml"),
        "activations": ["polynorm", "gelu"],
        "baseline": "gelu",
        "seeds": [1, 2],
        "overrides": TINY,
        "study_dir": str(study_dir),
        **extra,
    }
    path.write_text(json.dumps(study))  # JSON is YAML
    return path


def run_study(args, env, check=True):
    """``python run_study.py ARGS`` in a worker forked from the fork server (torch already imported:
    ~2.5 s of CPU less per call); the runs it trains and scores are real launches all the same."""
    proc = run_tool(RUN_STUDY, args, None, timeout=1800, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Run 0 trained alone; run 1 stopped at step 3 (after its step-2 checkpoint); then the whole
    study run: run 0 must be skipped, run 1 resumed, runs 2 and 3 trained, the report written."""
    tmp = tmp_path_factory.mktemp("study")
    env = {**offline_env(tmp), "DENSE_MODEL_CACHE": str(tmp / "cache")}
    path = write_study(tmp / "study.yaml", tmp / "out")
    runs = tmp / "out" / "runs"
    run_study([path, "--task", "0"], env)
    first_metrics = (runs / "polynorm_s1" / "metrics.jsonl").read_bytes()
    # Run 1 is killed (the whole process tree, as a crashed node) once its step-2 checkpoint exists.
    proc = subprocess.Popen(
        [sys.executable, str(RUN_STUDY), str(path), "--task", "1"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    tracker = runs / "gelu_s1" / "checkpoints" / "latest_checkpointed_iteration.txt"
    while proc.poll() is None and not (tracker.is_file() and tracker.read_text().strip() == "2"):
        time.sleep(0.2)
    assert proc.poll() is None, "run 1 finished before it could be killed"
    kill_process_tree(proc.pid)
    proc.wait()
    assert (runs / "gelu_s1" / "checkpoints" / "iter_0000002").is_dir()
    final = run_study([path], env)
    return {
        "tmp": tmp,
        "env": env,
        "path": path,
        "runs": runs,
        "first_metrics": first_metrics,
        "out": final.stdout,
    }


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_finished_runs_are_skipped_and_interrupted_ones_resumed(study):
    runs = study["runs"]
    assert "polynorm_s1: finished, skipped" in study["out"]
    assert (runs / "polynorm_s1" / "metrics.jsonl").read_bytes() == study["first_metrics"]
    assert "resumed from" in (runs / "gelu_s1" / "study.log").read_text()
    steps = [r["step"] for r in read_records(runs / "gelu_s1") if "loss" in r]
    assert steps == [2, 4]  # step 3 was never logged; step 4 after the resume


@pytest.mark.slow
def test_seeds_change_initialisation_and_data_order(study):
    import yaml

    config = yaml.safe_load((study["runs"] / "polynorm_s2" / "config.yaml").read_text())
    assert config["training"]["seed"] == 2 and config["training"]["data_seed"] == 2
    assert config["model"]["activation"] == "polynorm"
    first_loss = {
        name: next(r["loss"] for r in read_records(study["runs"] / name) if "loss" in r)
        for name in ("polynorm_s1", "polynorm_s2")
    }
    assert first_loss["polynorm_s1"] != first_loss["polynorm_s2"]


@pytest.mark.slow
def test_report_numbers_match_the_runs_metrics(study):
    out = study["tmp"] / "out"
    report = json.loads((out / "report.json").read_text())
    final_val = {
        name: [r for r in read_records(study["runs"] / name) if r.get("step") == 4 and "val_loss" in r][-1][
            "val_loss"
        ]
        for name in ("polynorm_s1", "polynorm_s2", "gelu_s1", "gelu_s2")
    }
    assert all(r["finished"] and r["tokens"] == 4 * 4 * 128 for r in report["runs"])
    assert report["token_counts"] == [2048]
    group = report["groups"][0]
    assert group["summary"]["polynorm"]["n"] == 2
    assert group["summary"]["polynorm"]["val_loss_mean"] == pytest.approx(
        (final_val["polynorm_s1"] + final_val["polynorm_s2"]) / 2
    )
    (vs_gelu,) = group["vs_baseline"]
    a = [final_val["polynorm_s1"], final_val["polynorm_s2"]]
    b = [final_val["gelu_s1"], final_val["gelu_s2"]]
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (vs_gelu["ci_low"], vs_gelu["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert sorted(group["ranking"]) == ["gelu", "polynorm"]
    markdown = (out / "report.md").read_text()
    assert "| polynorm_s2 | polynorm | 2 |" in markdown and "95% paired t" in markdown
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_coefficients_are_logged_and_plotted(study):
    polynorm = [
        r["activation_stats"] for r in read_records(study["runs"] / "polynorm_s2") if "activation_stats" in r
    ]
    gelu = [r["activation_stats"] for r in read_records(study["runs"] / "gelu_s2") if "activation_stats" in r]
    assert len(polynorm) == 2 and len(gelu) == 2  # steps 2 and 4
    for layer in (0, 1):
        assert {f"layer{layer}/a{i}" for i in range(4)} <= set(polynorm[-1])
        assert (
            polynorm[-1][f"layer{layer}/in_rms"] > 0 and 0 <= polynorm[-1][f"layer{layer}/outlier_frac"] < 1
        )
    assert polynorm[0]["layer0/a1"] != polynorm[-1]["layer0/a1"]  # the coefficients train
    assert "layer0/a0" not in gelu[-1] and gelu[-1]["layer0/out_rms"] > 0
    png = study["tmp"] / "plot.png"
    # Forked from the fork server (its imports done): plot_runs.py's own start is tests/scripts' business.
    proc = run_tool(REPO / "scripts/plot_runs.py", [study["runs"] / "polynorm_s2", "-o", png], study["tmp"])
    assert proc.returncode == 0, proc.stderr
    assert (study["tmp"] / "plot_coefficients.png").read_bytes()[:4] == b"\x89PNG"


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_array_with_stand_in_sbatch_srun_scontrol(tmp_path):
    """One array task per unfinished run; each task runs run_pretrain.sh once per node (2 nodes)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "calls.jsonl"
    # sbatch: records its arguments, prints a job id, runs nothing (the test runs the array tasks).
    _script(
        bin_dir / "sbatch",
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(record)!r}, 'a').write(json.dumps({{'sbatch': sys.argv[1:]}}) + '\\n')\nprint('4242')\n",
    )
    _script(bin_dir / "scontrol", "#!/bin/sh\nprintf '%s\\n' node0 node1\n")
    _script(
        bin_dir / "srun",
        "#!/usr/bin/env bash\nwhile [[ $1 == -* ]]; do shift; done\n"
        'for id in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$id "$@" || rc=$?; done\nexit ${rc:-0}\n',
    )
    # The training interpreter run_pretrain.sh starts (PYTHON): records torchrun's arguments.
    _script(
        bin_dir / "fake_python",
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"open({str(record)!r}, 'a').write(json.dumps({{'torchrun': sys.argv[1:], "
        "'port': os.environ.get('MASTER_PORT')}) + '\\n')\n",
    )
    env = {k: v for k, v in offline_env(tmp_path).items() if not k.startswith("SLURM_")}
    for key in ("PYTHON", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE"):
        env.pop(key, None)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    study_dir = tmp_path / "out"
    path = write_study(
        tmp_path / "study.yaml",
        study_dir,
        overrides=[*TINY, "training.micro_batch_size=2"],  # DP 2
        launch={"nnodes": 2, "gpus_per_node": 1},
        slurm={"time": "01:00:00", "sbatch_args": ["--account=acme"]},
    )
    # Run 0 (polynorm_s1) is finished: its checkpoint tracker is at the last step.
    from dense_model.checkpoint import TRACKER

    (study_dir / "runs/polynorm_s1/checkpoints").mkdir(parents=True)
    (study_dir / "runs/polynorm_s1/checkpoints" / TRACKER).write_text("4")

    proc = run_study([path, "--slurm"], env)
    assert "submitted array job 4242" in proc.stdout
    array_call, report_call = [json.loads(line)["sbatch"] for line in record.read_text().splitlines()]
    script = study_dir / "study.sbatch"
    assert array_call == ["--parsable", "--array=1,2,3", str(script)]
    assert "--dependency=afterany:4242" in report_call
    assert any(a.startswith("--wrap=") and a.endswith("--report-only") for a in report_call)
    text = script.read_text()
    assert (
        "#SBATCH --nodes=2" in text and "#SBATCH --account=acme" in text and "#SBATCH --time=01:00:00" in text
    )

    record.unlink()
    task_env = {
        **env,
        "PYTHON": str(bin_dir / "fake_python"),
        "SLURM_ARRAY_TASK_ID": "2",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[0-1]",
    }
    task = subprocess.run(["bash", str(script)], cwd=tmp_path, env=task_env, capture_output=True, text=True)
    # The stand-in trains nothing, so the task ends by saying the run has not reached its last step.
    assert task.returncode != 0
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    # run_pretrain.sh runs one Python per node: the config check, then torchrun (after --torchrun)
    calls = [c for c in calls if c["torchrun"][:2] == ["-m", "dense_model.launcher"]]
    assert len(calls) == 2  # one run_pretrain.sh (torchrun) per node
    for node, call in enumerate(calls):
        argv = call["torchrun"][call["torchrun"].index("--torchrun") + 1 :]
        assert argv[argv.index("--nnodes") + 1] == "2" and argv[argv.index("--node_rank") + 1] == str(node)
        assert argv[argv.index("--master_addr") + 1] == "node0" and call["port"] == str(29500 + 2)
        assert "model.activation=swiglu" not in argv
        assert "model.activation=polynorm" in argv and "training.seed=2" in argv  # run 2 = polynorm_s2
        assert f"run_dir={study_dir.resolve() / 'runs' / 'polynorm_s2'}" in argv
    log = (study_dir / "runs/polynorm_s2/study.log").read_text()
    assert "before the last step" in log


@pytest.mark.slow
def test_lm_eval_tasks_are_run_on_trained_runs_and_reported(study):
    """The same study with a (local) lm-eval task: training is skipped, each run is scored, and the
    scores land in the report next to lm-eval's own results JSON."""
    path = write_study(
        study["tmp"] / "study_eval.yaml",
        study["tmp"] / "out",
        eval_tasks=["tiny_python_mc"],
        eval_args=["--include_path", str(REPO / "examples/lm_eval_tasks"), "--limit", "4"],
    )
    before = (study["runs"] / "gelu_s2" / "metrics.jsonl").read_bytes()
    run_study([path], study["env"])
    assert (study["runs"] / "gelu_s2" / "metrics.jsonl").read_bytes() == before  # not retrained
    report = json.loads((study["tmp"] / "out" / "report.json").read_text())
    for row in report["runs"]:
        results = next((Path(row["run_dir"]) / "lm_eval").rglob("results*.json"))
        acc = json.loads(results.read_text())["results"]["tiny_python_mc"]
        expected = acc.get("acc_norm,none", acc.get("acc,none"))
        assert row["lm_eval"] == {
            f"tiny_python_mc/{'acc_norm' if 'acc_norm,none' in acc else 'acc'}": expected
        }
    assert "tiny_python_mc/" in (study["tmp"] / "out" / "report.md").read_text()


@pytest.mark.slow  # reads the study the previous (slow) test evaluated: the two run together
def test_lm_eval_results_are_stamped_and_torn_or_older_ones_do_not_count(study):
    """The results the previous test published carry the checkpoint iteration and the task list;
    results of an older checkpoint or another task list are not current, and a torn results file
    marks its run not evaluated (said in study.log), neither crashes the report, and the study
    command evaluates that run again."""
    from dense_model.studies import runner
    from dense_model.studies.spec import load_study

    path = study["tmp"] / "study_eval.yaml"  # written by the previous test
    spec = load_study(path)
    names = [r.name for r in spec.runs()]
    run = spec.runs()[names.index("gelu_s2")]
    (results,) = list((run.run_dir / "lm_eval").rglob("results*.json"))
    data = json.loads(results.read_text())
    assert data["dense_model_study"] == {"iteration": 4, "tasks": ["tiny_python_mc"]}
    assert not list(run.run_dir.glob("lm_eval.tmp-*"))
    assert runner.is_evaluated(spec, run)
    for stamp in ({"iteration": 2, "tasks": ["tiny_python_mc"]}, {"iteration": 4, "tasks": ["other"]}):
        results.write_text(json.dumps({**data, "dense_model_study": stamp}))
        assert not runner.is_evaluated(spec, run)
    results.write_text(json.dumps(data)[:200])  # a write cut by a kill
    said = []
    assert not runner.is_evaluated(spec, run, say=said.append)
    assert said == [f"gelu_s2: {results} is unreadable (JSONDecodeError); the run counts as not evaluated"]
    run_study([path, "--report-only"], study["env"])  # no crash on the torn file
    run_study([path, "--task", names.index("gelu_s2")], study["env"])
    assert runner.is_evaluated(spec, run, say=lambda m: None)
    assert "is unreadable" in (run.run_dir / "study.log").read_text()
    assert results.with_name(results.name + ".torn").is_file() and not results.exists()  # set aside
    run_study([path, "--report-only"], study["env"])
    report = json.loads((study["tmp"] / "out" / "report.json").read_text())
    (row,) = [r for r in report["runs"] if r["name"] == "gelu_s2"]
    assert list(row["lm_eval"]) and list(row["lm_eval"])[0].startswith("tiny_python_mc/")


@pytest.mark.slow  # reads the study the lm-eval test evaluated: they run together
def test_results_are_stamped_with_the_iteration_lm_eval_scored_when_the_run_trained_on(study, tmp_path):
    """lm-eval scores iteration 4; before the study publishes, the run saves iteration 6 (the trainer's
    order: the folder, then the tracker). The results say 4, as lm-eval's own config does, and count
    for iteration 4 only: at 6 the run is not evaluated, so the next study command scores it again."""
    from dense_model.studies import runner
    from dense_model.studies.spec import load_study

    path = study["tmp"] / "study_eval.yaml"  # written by the lm-eval test
    spec = load_study(path)
    names = [r.name for r in spec.runs()]
    run = spec.runs()[names.index("polynorm_s2")]
    checkpoints = run.run_dir / "checkpoints"
    shutil.rmtree(run.run_dir / "lm_eval")  # not evaluated: the study command scores it
    # PYTHON for run_lm_eval.sh: lm-eval, then the run "trains on" to iteration 6 before the publish.
    _script(
        tmp_path / "python",
        f'#!/bin/sh\n"{sys.executable}" "$@" || exit $?\ncase "$*" in *run_lm_eval.py*)\n'
        f'  cp -r "{checkpoints}/iter_0000004" "{checkpoints}/iter_0000006"\n'
        f'  echo 6 > "{checkpoints}/latest_checkpointed_iteration.txt" ;;\nesac\n',
    )
    try:
        run_study(
            [path, "--task", names.index("polynorm_s2")], {**study["env"], "PYTHON": str(tmp_path / "python")}
        )
        assert runner.read_latest_iteration(checkpoints) == 6, "the stand-in did not train on"
        (results,) = list((run.run_dir / "lm_eval").rglob("results*.json"))
        data = json.loads(results.read_text())
        assert data["config"]["dense_model_iteration"] == 4
        assert data["dense_model_study"] == {"iteration": 4, "tasks": ["tiny_python_mc"]}
        assert not runner.is_evaluated(spec, run), "iteration 4's scores counted for iteration 6"
    finally:  # the study as it was, for the tests that read it after this one
        (checkpoints / "latest_checkpointed_iteration.txt").write_text("4\n")
        shutil.rmtree(checkpoints / "iter_0000006", ignore_errors=True)
    assert runner.is_evaluated(spec, run)
