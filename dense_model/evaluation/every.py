"""Score every saved checkpoint of a run (or of a study's runs) with lm-eval, each iteration once.

    run_lm_eval.sh RUN_DIR TASKS --every-checkpoint [lm-eval options]
    run_lm_eval.sh STUDY_DIR TASKS --every-checkpoint --slurm [lm-eval options]

Each saved ``checkpoints/iter_NNNNNNN`` not yet scored is scored by lm-eval in this process (lm-eval,
torch and megatron-core imported once per job; with ``TP`` > 1 each iteration is a plain
``run_lm_eval.sh`` on that folder, torchrun's ranks), into ``RUN_DIR/lm_eval/iter_NNNNNNN``, through
``fsreplace.replacing``: under ``RUN_DIR/lm_eval/.iter_NNNNNNN.lock`` (``procutil.held_lock``: an
``O_EXCL`` file naming its holder, a dead holder's taken over) lm-eval writes into a staging folder
that is fsynced and renamed into place when complete. So two jobs on one run never score one
iteration at once (the second skips it, naming the holder, and goes on with the others), a kill
leaves no result that counts, and the next job removes what the killed one left. Every results JSON
carries ``STAMP``: the iteration, the tokens trained (iteration x global batch x sequence length),
the tasks, ``num_fewshot`` and ``limit``; an iteration whose results carry the same stamp (tokens
aside) is skipped (checked again under the lock). ``--slurm`` writes one SLURM array task per
unscored iteration instead; each task is this command restricted to its iteration (``--iteration N``).
"""

from __future__ import annotations

import gc
import json
import os
import shlex
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

from dense_model.checkpoint import CHECKPOINTS, METADATA, iteration_dir
from dense_model.checkpoint.layout import _iteration_folders, fsync_write
from dense_model.evaluation import harness
from dense_model.fsreplace import ReplaceError, TargetBusy, replacing
from dense_model.sbatch import sbatch_header

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "toolkits" / "evaluation" / "run_lm_eval.sh"
EVAL_DIR = "lm_eval"  # RUN_DIR/lm_eval/: what scripts/plot_runs.py and the studies read
STAMP = "dense_model_every_checkpoint"  # key added to lm-eval's results JSON
SCRIPT = "lm_eval_every_checkpoint.sbatch"
KEY_OPTIONS = ("--num_fewshot", "--limit")  # options that change the scores: part of the stamp


class EveryCheckpointError(ValueError):
    """Bad input: the message names the path or option and the fix."""


def _option(rest: list[str], name: str) -> str | None:
    for i, arg in enumerate(rest):
        if arg == name and i + 1 < len(rest):
            return rest[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def run_dirs(path: Path) -> list[Path]:
    """``path`` when it is a run directory (has checkpoints/), else the run directories below it
    (a study's ``runs/*``), sorted."""
    if (path / CHECKPOINTS).is_dir():
        return [path]
    if not path.is_dir():
        raise EveryCheckpointError(f"{path} does not exist: give a run directory or a study directory")
    found = sorted(p.parent for p in path.glob("**/" + CHECKPOINTS) if p.is_dir() and EVAL_DIR not in p.parts)
    if not found:
        raise EveryCheckpointError(
            f"{path} holds no {CHECKPOINTS}/ folder: give a run directory (RUN_DIR/{CHECKPOINTS}/iter_*) "
            "or a study directory whose runs have one"
        )
    return found


def saved_iterations(run_dir: Path) -> list[int]:
    """The published iterations of ``run_dir`` (folders with their metadata), as listed now."""
    return [n for n, folder in _iteration_folders(run_dir / CHECKPOINTS) if (folder / METADATA).is_file()]


def stamp_of(tasks: str, rest: list[str], iteration: int) -> dict:
    return {
        "iteration": iteration,
        "tasks": [t for t in tasks.split(",") if t],
        **{o.lstrip("-"): _option(rest, o) for o in KEY_OPTIONS},
    }


def _same(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "tokens"} == {k: v for k, v in b.items() if k != "tokens"}


def is_scored(run_dir: Path, stamp: dict) -> bool:
    final = run_dir / EVAL_DIR / iteration_dir("", stamp["iteration"]).name
    for path in final.rglob("results*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get(STAMP), dict) and _same(data[STAMP], stamp):
            return True
    return False


class _Unpublished(Exception):
    """Leave the ``replacing`` block without publishing (the staging folder is removed)."""

    def __init__(self, status: str):
        super().__init__(status)
        self.status = status


def _say(message: str) -> None:
    print(f"run_lm_eval: {message}", flush=True)


def _lm_eval(folder: Path, tasks: str, rest: list[str], output: Path) -> int:
    """lm-eval on ``folder`` into ``output``: in this process, or with TP > 1 through
    run_lm_eval.sh (torchrun's ranks, one process group per checkpoint). Exit status."""
    if int(os.environ.get("TP", "1")) > 1:
        return subprocess.run(
            ["bash", str(RUNNER), str(folder), tasks, *rest, "--output_path", str(output)]
        ).returncode
    try:
        return harness.evaluate(folder, tasks, [*rest, "--output_path", str(output)])
    except harness.UnknownTasks as err:
        raise EveryCheckpointError(str(err)) from None  # the same for every iteration: stop
    except Exception:  # this checkpoint's failure (pruned while loading, ...): said, the next one scored
        traceback.print_exc()
        return 1
    finally:
        gc.collect()  # the model and lm-eval's requests of this iteration, before the next loads


def score_iteration(run_dir: Path, iteration: int, tasks: str, rest: list[str]) -> str:
    """Score one iteration: 'scored', 'skipped' (done before), 'busy' (another job scores it now),
    'gone' (pruned) or 'failed'."""
    stamp = stamp_of(tasks, rest, iteration)
    folder = iteration_dir(run_dir / CHECKPOINTS, iteration)
    name = folder.name
    final = run_dir / EVAL_DIR / name
    if is_scored(run_dir, stamp):
        _say(f"{run_dir} {name}: already scored with these tasks, skipped")
        return "skipped"
    if not (folder / METADATA).is_file():
        _say(f"{run_dir} {name}: no longer saved (pruned by keep_last?), skipped")
        return "gone"
    try:
        with replacing(
            final,
            what="lm-eval --every-checkpoint",
            overwrite=True,
            label="results folder",
            ours=lambda _: True,  # RUN_DIR/lm_eval/iter_N is only ever this tool's output
            say=_say,
        ) as tmp:
            if is_scored(run_dir, stamp):  # by another job, between the check above and the lock
                _say(f"{run_dir} {name}: already scored with these tasks, skipped")
                raise _Unpublished("skipped")
            _say(f"{run_dir} {name}: scoring {tasks}")
            code = _lm_eval(folder, tasks, rest, tmp)
            results = sorted(tmp.rglob("results*.json"))
            if code != 0 or not results:
                if not (folder / METADATA).is_file():
                    _say(f"{run_dir} {name}: pruned while being scored, skipped")
                    raise _Unpublished("gone")
                print(
                    f"run_lm_eval: {run_dir} {name}: lm-eval failed (exit status {code})",
                    file=sys.stderr,
                    flush=True,
                )
                raise _Unpublished("failed")
            for path in results:
                data = json.loads(path.read_text())
                # the tokens trained, as the adapter counts them (the iteration's global batches x seq length)
                data[STAMP] = {**stamp, "tokens": data.get("config", {}).get("dense_model_tokens")}
                fsync_write(path, json.dumps(data, indent=2))
            if final.exists():  # results of another task list: replaced (the old folder deleted last)
                _say(f"{final}: results of another task list or options replaced")
    except _Unpublished as done:
        return done.status
    except TargetBusy as busy:
        h = busy.holder
        _say(
            f"{run_dir} {name}: being scored by another job (host {h.get('host', '?')}, pid "
            f"{h.get('pid', '?')}, since {h.get('since', '?')}), skipped; rerun afterwards for what it leaves"
        )
        return "busy"
    except ReplaceError as err:  # RUN_DIR/lm_eval/iter_N is a file or a link: the user's to sort out
        raise EveryCheckpointError(str(err)) from None
    return "scored"


def todo(runs: list[Path], tasks: str, rest: list[str]) -> list[tuple[Path, int]]:
    """(run directory, iteration) of every saved iteration not yet scored."""
    return [(r, n) for r in runs for n in saved_iterations(r) if not is_scored(r, stamp_of(tasks, rest, n))]


def slurm_script(pairs: list[tuple[Path, int]], tasks: str, rest: list[str], log_dir: Path) -> str:
    """An sbatch script: array task i scores iteration ITERS[i] of run RUNS[i] (one node, TP GPUs;
    partition, account, time limit from sbatch's own SBATCH_* environment variables)."""
    tp = int(os.environ.get("TP", "1"))
    python = os.environ.get("PYTHON", sys.executable)
    args = " ".join(shlex.quote(a) for a in [tasks, "--every-checkpoint", *rest])
    head = sbatch_header(
        "One array task per unscored checkpoint iteration (written by run_lm_eval.sh --every-checkpoint --slurm).",
        job_name="lm_eval_every",
        nodes=1,
        gpus_per_node=tp,
        log_dir=str(log_dir),
        workdir=str(REPO),
    )
    return "\n".join(
        [
            *head,
            f"RUNS=({' '.join(shlex.quote(str(r.resolve())) for r, _ in pairs)})",
            f"ITERS=({' '.join(str(n) for _, n in pairs)})",
            f"export TP={tp} PYTHON={shlex.quote(python)}",
            'i="$SLURM_ARRAY_TASK_ID"',
            f'exec bash toolkits/evaluation/run_lm_eval.sh "${{RUNS[$i]}}" {args} --iteration "${{ITERS[$i]}}"',
            "",
        ]
    )


def main(path: str, tasks: str, rest: list[str]) -> int:
    """``run_lm_eval.sh PATH TASKS --every-checkpoint [--slurm] [--iteration N] [lm-eval options]``
    with ``--every-checkpoint`` already taken out of ``rest``. Exit status."""
    slurm = "--slurm" in rest
    rest = [a for a in rest if a != "--slurm"]
    only = _option(rest, "--iteration")
    if only is not None:
        i = next(i for i, a in enumerate(rest) if a.startswith("--iteration"))
        del rest[i : i + (1 if "=" in rest[i] else 2)]
        if not only.isdigit():
            raise EveryCheckpointError(f"--iteration {only}: give an iteration number")
    if _option(rest, "--output_path") is not None or "-o" in rest:
        raise EveryCheckpointError(
            f"--output_path: with --every-checkpoint the results go to RUN_DIR/{EVAL_DIR}/iter_NNNNNNN; leave it out"
        )
    runs = run_dirs(Path(path))
    if only is not None:
        if len(runs) != 1:
            raise EveryCheckpointError(f"--iteration: {path} is not one run directory; give the run's own")
        pairs = [(runs[0], int(only))]
    else:
        pairs = [(r, n) for r in runs for n in saved_iterations(r)]
    if slurm:
        pending = todo(runs, tasks, rest) if only is None else pairs
        if not pending:
            print("run_lm_eval: every saved iteration is scored already; nothing to submit", flush=True)
            return 0
        base = Path(path)
        log_dir = (base / EVAL_DIR / "slurm").resolve()
        log_dir.mkdir(parents=True, exist_ok=True)
        script = base / EVAL_DIR / SCRIPT
        script.write_text(slurm_script(pending, tasks, rest, log_dir))
        submit = ["sbatch", "--parsable", f"--array=0-{len(pending) - 1}", str(script)]
        listing = ", ".join(f"{r.name}:{n}" for r, n in pending)
        print(f"run_lm_eval: {len(pending)} iteration(s) to score ({listing}); script {script}", flush=True)
        if shutil.which("sbatch") is None:
            print(f"run_lm_eval: sbatch is not on PATH; submit it with: {shlex.join(submit)}", flush=True)
            return 0
        job = subprocess.run(submit, check=True, capture_output=True, text=True).stdout.strip()
        print(f"run_lm_eval: submitted array job {job.split(';')[0]}", flush=True)
        return 0
    counts = {"scored": 0, "skipped": 0, "busy": 0, "gone": 0, "failed": 0}
    for run, n in pairs:
        counts[score_iteration(run, n, tasks, rest)] += 1
    print("run_lm_eval: every checkpoint: " + ", ".join(f"{v} {k}" for k, v in counts.items()), flush=True)
    return 1 if counts["failed"] else 0
