"""Downstream tasks in the training loop (evaluation.in_loop): what the check before launch refuses
(the launcher's check, in process), and on the trainer's gloo ranks that the in-loop scores change no
training loss, survive a kill and relaunch logged once per iteration, and equal run_lm_eval's on the
checkpoint of the same iteration, request by request, at DP=2 and at TP=2."""

import json
import os
import signal
from pathlib import Path

import pytest

from dense_model.launcher import main as launcher_main
from tests.training.pretrain_jobs import REPO, read_metrics, train_in_workers, trained_ok

TASKS = REPO / "examples" / "lm_eval_tasks"
LIMIT = 6
# Six steps, a checkpoint every 2; the tasks scored at steps 3 and 6.
SHORT = ["training.train_iters=6", "checkpoint.save_interval=2", "logging.eval_interval=0"]
IN_LOOP = [
    "evaluation.in_loop.tasks=[tiny_python_mc,tiny_python_ppl]",
    "evaluation.in_loop.interval=3",
    f"evaluation.in_loop.limit={LIMIT}",
    f"evaluation.in_loop.include_path={TASKS}",
]


def downstream_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if any(k.startswith("downstream/") for k in r)]


# --------------------------------------------------------------------------- before launch


def test_a_task_that_cannot_run_is_one_line_before_launch_and_nothing_is_written(
    tiny_config, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(REPO)  # the shipped tasks' data_files are relative to the repository root
    hub_task = tmp_path / "hub_tasks"
    hub_task.mkdir()
    (hub_task / "hub_mc.yaml").write_text(
        "task: hub_mc\ndataset_path: dense-model-tests/not-a-cached-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n"
        "metric_list:\n  - metric: acc\n"
    )
    cases = [
        (
            ["evaluation.in_loop.tasks=[tiny_python_mcq]", f"evaluation.in_loop.include_path={TASKS}"],
            "evaluation.in_loop.tasks: lm-eval does not know tiny_python_mcq;",
        ),
        (
            ["evaluation.in_loop.tasks=[hub_mc]", f"evaluation.in_loop.include_path={hub_task}"],
            "evaluation.in_loop.tasks: hub_mc cannot be built offline",
        ),
        (
            ["evaluation.in_loop.tasks=[tiny_python_mc]", f"evaluation.in_loop.include_path={tmp_path / 'nope'}"],
            f"evaluation.in_loop.include_path={tmp_path / 'nope'}: no such folder",
        ),
        (
            ["evaluation.in_loop.tasks=[tiny_python_mc]", "parallel.pipeline_model_parallel_size=2"],
            "evaluation.in_loop.tasks is set but parallel.pipeline_model_parallel_size=2",
        ),
    ]
    for i, (extra, said) in enumerate(cases):
        config, run_dir = tiny_config(f"bad{i}", *extra)
        assert launcher_main([str(config), "--world-size", "2"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("config error: " + said), err
        assert len(err.splitlines()) == 1, err
        assert not run_dir.exists()


# --------------------------------------------------------------------------- in the loop


class _DumpRequests:
    """f(Trainer) -> a Trainer that writes each in-loop evaluation's requests and answers (every
    rank: RUN_DIR/in_loop_requests.stepN.rankR.json) and, with ``kill_at``, SIGKILLs itself right
    after the evaluation of that step is logged, on the first attempt only."""

    def __init__(self, kill_at: int | None = None):
        self.kill_at = kill_at

    def __call__(self, base):
        kill_at = self.kill_at

        class Dumping(base):
            def _evaluate_downstream(self):
                super()._evaluate_downstream()
                step = self.state.iteration
                answers = {
                    name: [[inst.arguments, inst.resps] for inst in task.instances]
                    for name, task in self.downstream.tasks["tasks"].items()
                }
                out = self.run_dir / f"in_loop_requests.step{step}.rank{self.rank}.json"
                out.write_text(json.dumps(answers))
                marker = self.run_dir / "killed_once"
                if step == kill_at and not marker.exists():
                    marker.write_text("")
                    os.kill(os.getpid(), signal.SIGKILL)

        return Dumping


@pytest.fixture(scope="module")
def plain_run(module_tiny_config):
    config, run_dir = module_tiny_config("plain", *SHORT)
    trained_ok(config)
    return run_dir


@pytest.mark.slow
def test_in_loop_evaluation_changes_no_training_loss_and_is_logged(module_tiny_config, plain_run, monkeypatch):
    monkeypatch.chdir(REPO)
    config, run_dir = module_tiny_config("in_loop", *SHORT, *IN_LOOP)
    out = trained_ok(config)
    assert read_metrics(run_dir)[0] == read_metrics(plain_run)[0]  # bitwise: the same floats
    records = downstream_records(run_dir)
    assert [r["step"] for r in records] == [3, 6], records
    for r in records:
        assert r["tokens"] == r["step"] * 8 * 64
        assert 0 <= r["downstream/tiny_python_mc/acc"] <= 1
        assert r["downstream/tiny_python_ppl/word_perplexity"] > 1
        assert r["downstream/seconds"] > 0 and 0 < r["downstream/time_share"] < 1
    assert "downstream tiny_python_mc/acc" in out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("downstream/tiny_python_mc/acc")] == [3, 6]


@pytest.mark.slow
def test_a_kill_after_an_in_loop_evaluation_and_a_relaunch_log_it_once(module_tiny_config, plain_run, monkeypatch):
    monkeypatch.chdir(REPO)
    config, run_dir = module_tiny_config("killed", *SHORT, *IN_LOOP)
    with pytest.raises(Exception):  # the worker SIGKILLed after step 3's evaluation, before step 4's save
        train_in_workers(config, trainer=_DumpRequests(kill_at=3))
    assert [r["step"] for r in downstream_records(run_dir)] == [3]
    first = json.loads((run_dir / "in_loop_requests.step3.rank0.json").read_text())
    code, out = train_in_workers(config, trainer=_DumpRequests())
    assert code == 0, out
    assert "resumed from" in out and "at step 2" in out
    assert read_metrics(run_dir)[0] == read_metrics(plain_run)[0]
    assert [r["step"] for r in downstream_records(run_dir)] == [3, 6]
    assert json.loads((run_dir / "in_loop_requests.step3.rank0.json").read_text()) == first
