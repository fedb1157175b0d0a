"""Launching a study's runs: one after another on this machine, or as one SLURM job array.

Every run goes through ``run_pretrain.sh`` with the study's base config and the run's overrides, so
a run of a study is an ordinary run: it resumes from its own ``checkpoints/`` when relaunched. A run
is finished when its latest checkpoint is at the run's last step (and, when the study names lm-eval
tasks, ``lm_eval/`` holds readable results stamped with the iteration lm-eval scored, that checkpoint's,
and the study's task list: ``publish_results`` writes them atomically); finished runs are skipped, so rerunning the
study command after an interruption only trains and evaluates what is missing.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from dense_model.checkpoint import read_latest_iteration
from dense_model.checkpoint.layout import fsync_write
from dense_model.sbatch import sbatch_header
from dense_model.studies.spec import Study, StudyRun
from dense_model.training.optim import schedule_steps

REPO = Path(__file__).resolve().parents[2]
EVAL_DIR = "lm_eval"
STAMP = "dense_model_study"  # key added to lm-eval's results JSON: the iteration and tasks it belongs to


def _python() -> str:
    """The interpreter run_pretrain.sh and run_lm_eval.sh use (their PYTHON), this one by default."""
    return os.environ.get("PYTHON", sys.executable)


def expected_steps(study: Study, run: StudyRun) -> int:
    return schedule_steps(study.run_config(run))[0]


def is_trained(study: Study, run: StudyRun) -> bool:
    return read_latest_iteration(run.run_dir / "checkpoints") == expected_steps(study, run)


def eval_stamp(study: Study, run: StudyRun) -> dict:
    """What lm-eval results must belong to, to count for ``run`` now: its latest checkpoint's
    iteration and the study's task list."""
    return {"iteration": read_latest_iteration(run.run_dir / "checkpoints"), "tasks": list(study.eval_tasks)}


def scored_iteration(results: dict) -> int | None:
    """The checkpoint iteration lm-eval scored: our adapter's ``dense_model_iteration`` in the results'
    ``config`` (``DenseModelLM.get_model_info``); None when absent (such results never count)."""
    config = results.get("config")
    return config.get("dense_model_iteration") if isinstance(config, dict) else None


def current_results(study: Study, run: StudyRun, say=print) -> list[dict]:
    """The run's lm-eval results (``results*.json`` under ``lm_eval/``) made from its latest
    checkpoint with the study's tasks. An unreadable file (a torn write) or results of an older
    checkpoint or another task list do not count (the unreadable ones are named through ``say``)."""
    stamp, found = eval_stamp(study, run), []
    for path in sorted((run.run_dir / EVAL_DIR).rglob("results*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            say(
                f"{run.name}: {path} is unreadable ({err.__class__.__name__}); the run counts as not evaluated"
            )
            continue
        if isinstance(data, dict) and data.get(STAMP) == stamp:
            found.append(data)
    return found


def is_evaluated(study: Study, run: StudyRun, say=print) -> bool:
    return not study.eval_tasks or bool(current_results(study, run, say))


def publish_results(study: Study, run: StudyRun, staging: Path) -> None:
    """Move lm-eval's output from ``staging`` into ``lm_eval/``: every results file stamped with
    the iteration lm-eval scored (not the tracker's now: the run may have trained on meanwhile) and
    the task list, written to a temporary name, fsynced and renamed (a kill
    leaves the old results or the new, never a torn file); other files (samples) renamed first. An
    unreadable results file already there is renamed to ``*.json.torn``."""
    target = run.run_dir / EVAL_DIR
    for path in target.rglob("results*.json"):  # a torn file, evaluated again now: set it aside
        try:
            json.loads(path.read_text())
        except ValueError:
            os.replace(path, path.with_name(path.name + ".torn"))
    results = sorted(staging.rglob("results*.json"))
    for path in sorted(p for p in staging.rglob("*") if p.is_file() and p not in results):
        dest = target / path.relative_to(staging)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
    for path in results:
        data = json.loads(path.read_text())
        data[STAMP] = {"iteration": scored_iteration(data), "tasks": list(study.eval_tasks)}
        dest = target / path.relative_to(staging)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fsync_write(dest, json.dumps(data, indent=2))


def is_finished(study: Study, run: StudyRun) -> bool:
    return is_trained(study, run) and is_evaluated(study, run)


def _free_port() -> int:
    # Runs on a shared machine must not collide with other torchruns on the default 29500.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(study: Study, run: StudyRun) -> list[str]:
    return ["bash", str(REPO / "run_pretrain.sh"), str(study.base_config), *run.overrides]


def eval_command(study: Study, run: StudyRun, output: Path | None = None) -> list[str]:
    return [
        "bash",
        str(REPO / "toolkits/evaluation/run_lm_eval.sh"),
        str(run.run_dir),
        ",".join(study.eval_tasks),
        "--output_path",
        str(output or run.run_dir / EVAL_DIR),
        *study.eval_args,
    ]


def run_one(study: Study, run: StudyRun, pick_port: bool = True) -> int:
    """Train (resuming) and evaluate one run; its output goes to RUN_DIR/study.log. Exit status."""
    env = dict(os.environ, PYTHON=_python())
    env.setdefault("GPUS_PER_NODE", str(study.launch.get("gpus_per_node", 1)))
    env.setdefault("NNODES", str(study.launch.get("nnodes", 1)))
    if pick_port and "MASTER_PORT" not in os.environ:
        env["MASTER_PORT"] = str(_free_port())
    pythonpath = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{pythonpath}" if pythonpath else str(REPO)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    with open(run.run_dir / "study.log", "a") as log:
        if not is_trained(study, run):
            status = subprocess.call(train_command(study, run), stdout=log, stderr=subprocess.STDOUT, env=env)
            if status == 0 and not is_trained(study, run):
                print(
                    f"{run.name}: training exited 0 before the last step (a signal?); rerun to resume",
                    file=log,
                )
                return 1
            if status != 0:
                return status
        if env.get("SLURM_NODEID", "0") == "0" and not is_evaluated(
            study, run, say=lambda m: print(m, file=log)
        ):
            # lm-eval writes into a folder of its own; the results are published when it succeeded
            staging = Path(tempfile.mkdtemp(prefix=f"{EVAL_DIR}.tmp-", dir=run.run_dir))
            try:
                command = eval_command(study, run, staging)
                status = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
                if status == 0:
                    publish_results(study, run, staging)
                return status
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return 0


def run_sequential(study: Study) -> list[str]:
    """Train every unfinished run in turn; returns the names of runs that failed."""
    failed = []
    runs = study.runs()
    for i, run in enumerate(runs, 1):
        if is_finished(study, run):
            print(f"[{i}/{len(runs)}] {run.name}: finished, skipped", flush=True)
            continue
        print(f"[{i}/{len(runs)}] {run.name}: training (log {run.run_dir / 'study.log'})", flush=True)
        status = run_one(study, run)
        if status != 0:
            print(f"[{i}/{len(runs)}] {run.name}: failed (exit {status}), see its study.log", flush=True)
            failed.append(run.name)
    return failed


def slurm_script(study: Study) -> str:
    """One array task per run; every node of a task runs run_study.py --task, which calls
    run_pretrain.sh (NODE_RANK from SLURM_NODEID, MASTER_ADDR from the node list)."""
    s, launch = study.slurm, study.launch
    nodes = int(launch.get("nnodes", 1))
    gpus = int(launch.get("gpus_per_node", 1))
    log_dir = study.study_dir.resolve() / "slurm"
    lines = sbatch_header(
        f"Study {study.name}: one array task per run (written by toolkits/studies/run_study.py --slurm).",
        job_name=s.get("job_name", "study_" + study.name),
        nodes=nodes,
        gpus_per_node=gpus,
        log_dir=str(log_dir),
        workdir=str(REPO),
        time=s.get("time", "48:00:00"),
        signal="B:TERM@120",
        partition=s.get("partition"),
        extra=s.get("sbatch_args", []),
    )
    study_args = " ".join(
        shlex.quote(a) for a in [str(study.path.resolve()), "--study-dir", str(study.study_dir.resolve())]
    )
    lines += [
        # Two array tasks may share a node: give each its own rendezvous port.
        'export MASTER_PORT="${MASTER_PORT:-$((29500 + SLURM_ARRAY_TASK_ID % 1000))}"',
        f'export GPUS_PER_NODE="${{SLURM_GPUS_ON_NODE:-{gpus}}}"',
        f"srun --kill-on-bad-exit=1 {shlex.quote(sys.executable)} toolkits/studies/run_study.py {study_args} "
        '--task "$SLURM_ARRAY_TASK_ID" &',
        "SRUN=$!",
        "trap 'kill -TERM \"$SRUN\"' TERM",
        'wait "$SRUN" || wait "$SRUN"',
        "",
    ]
    return "\n".join(lines)


def submit_slurm(study: Study) -> str | None:
    """Write STUDY_DIR/study.sbatch, submit the unfinished runs as one array and a report job
    after it. Returns the array's job id (None when every run is finished)."""
    runs = study.runs()
    todo = [i for i, run in enumerate(runs) if not is_finished(study, run)]
    if not todo:
        return None
    (study.study_dir / "slurm").mkdir(parents=True, exist_ok=True)
    script = study.study_dir / "study.sbatch"
    script.write_text(slurm_script(study))
    array = ",".join(str(i) for i in todo)
    job = (
        subprocess.run(
            ["sbatch", "--parsable", f"--array={array}", str(script)],
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .split(";")[0]
    )
    report = " ".join(
        shlex.quote(a)
        for a in [
            sys.executable,
            str(REPO / "toolkits/studies/run_study.py"),
            str(study.path.resolve()),
            "--study-dir",
            str(study.study_dir.resolve()),
            "--report-only",
        ]
    )
    subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--dependency=afterany:{job}",
            f"--job-name=report_{study.name}",
            f"--output={study.study_dir.resolve() / 'slurm'}/%x-%j.out",
            f"--wrap=cd {shlex.quote(str(REPO))} && {report}",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return job
