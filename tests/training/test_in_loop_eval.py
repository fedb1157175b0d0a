"""Downstream tasks in the training loop (evaluation.in_loop): what the check before launch refuses
(the launcher's check, in process), and on the trainer's gloo ranks that the in-loop scores change no
training loss, survive a kill and relaunch logged once per iteration, and equal run_lm_eval's on the
checkpoint of the same iteration, request by request, at DP=2 and at TP=2."""

import json
import os
from pathlib import Path

import pytest
import torch.multiprocessing

from dense_model.launcher import main as launcher_main
from tests.training.pretrain_jobs import REPO, read_metrics, train_in_workers, trained_ok

TASKS = REPO / "examples" / "lm_eval_tasks"
LIMIT = 6
# Six steps, a checkpoint every 2; the tasks scored at steps 3 and 6. Dropout on, so that a random
# state drawn from or a model left in eval mode by an evaluation would change the next losses.
SHORT = [
    "training.train_iters=6",
    "checkpoint.save_interval=2",
    "logging.eval_interval=0",
    "model.hidden_dropout=0.1",
    "model.attention_dropout=0.1",
]
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
            ["evaluation.in_loop.tasks=[hub_mc]", f"evaluation.in_loop.include_path={hub_task}"],
            "evaluation.in_loop.tasks: hub_mc cannot be built offline",
        ),
        (
            [
                "evaluation.in_loop.tasks=[tiny_python_mc]",
                f"evaluation.in_loop.include_path={tmp_path / 'nope'}",
            ],
            f"evaluation.in_loop.include_path={tmp_path / 'nope'}: no such folder",
        ),
    ]
    for i, (extra, said) in enumerate(cases):
        config, run_dir = tiny_config(f"bad{i}", *extra)
        assert launcher_main([str(config), "--world-size", "2"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("config error: " + said), err
        assert len(err.splitlines()) == 1, err
        assert not run_dir.exists()


@pytest.mark.slow  # a name not among the local tasks makes lm-eval index its ~14,000 built-in files (12-30 s)
def test_a_task_lm_eval_does_not_know_is_one_line_before_launch(tiny_config, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    config, run_dir = tiny_config(
        "unknown", "evaluation.in_loop.tasks=[tiny_python_mcq]", f"evaluation.in_loop.include_path={TASKS}"
    )
    assert launcher_main([str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: evaluation.in_loop.tasks: lm-eval does not know tiny_python_mcq;"), (
        err
    )
    assert len(err.splitlines()) == 1, err
    assert not run_dir.exists()


# --------------------------------------------------------------------------- in the loop


class _DumpRequests:
    """f(Trainer) -> a Trainer that writes each in-loop evaluation's requests and answers (every
    rank: RUN_DIR/in_loop_requests.stepN.rankR.json) and, with ``kill_at``, SIGKILLs itself and its
    helpers right
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
                    name: [[inst.doc_id, inst.idx, inst.resps[0]] for inst in task.instances]
                    for name, task in self.downstream.tasks["tasks"].items()
                }
                out = self.run_dir / f"in_loop_requests.step{step}.rank{self.rank}.json"
                out.write_text(json.dumps(answers))
                marker = self.run_dir / "killed_once"
                if step == kill_at and not marker.exists():
                    marker.write_text("")
                    from dense_model.procutil import kill_process_tree

                    kill_process_tree(
                        os.getpid()
                    )  # with its helpers (dist_checkpointing's Manager), as a crash

        return Dumping


@pytest.fixture(scope="module")
def plain_run(module_tiny_config):
    config, run_dir = module_tiny_config("plain", *SHORT)
    trained_ok(config)
    return run_dir


@pytest.mark.slow
def test_in_loop_evaluation_changes_no_training_loss_and_is_logged(
    module_tiny_config, plain_run, monkeypatch
):
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
def test_a_kill_after_an_in_loop_evaluation_and_a_relaunch_log_it_once(
    module_tiny_config, plain_run, monkeypatch
):
    monkeypatch.chdir(REPO)
    config, run_dir = module_tiny_config("killed", *SHORT, *IN_LOOP)
    # the worker SIGKILLed after step 3's evaluation, before step 4's save
    with pytest.raises(torch.multiprocessing.ProcessExitedException, match="SIGKILL"):
        train_in_workers(config, trainer=_DumpRequests(kill_at=3))
    assert [r["step"] for r in downstream_records(run_dir)] == [3]
    first = json.loads((run_dir / "in_loop_requests.step3.rank0.json").read_text())
    code, out = train_in_workers(config, trainer=_DumpRequests())
    assert code == 0, out
    assert "resumed from" in out and "at step 2" in out
    assert read_metrics(run_dir)[0] == read_metrics(plain_run)[0]
    assert [r["step"] for r in downstream_records(run_dir)] == [3, 6]
    assert json.loads((run_dir / "in_loop_requests.step3.rank0.json").read_text()) == first
    trained_ok(config)  # a relaunch of the finished run trains nothing and scores nothing again
    assert [r["step"] for r in downstream_records(run_dir)] == [3, 6]


def _offline_job(rank, world_size, checkpoint, out_dir):
    """run_lm_eval.sh's module (dense_model.evaluation.run) on one checkpoint at TP = world size."""
    from dense_model.evaluation.run import main

    code = main(
        [checkpoint, "tiny_python_mc,tiny_python_ppl", "--include_path", str(TASKS), "--limit", str(LIMIT)]
        + ["--log_samples", "--output_path", out_dir]
    )
    assert code == 0


def _answers_by_request(dump: dict) -> dict:
    """{(task, doc_id, idx): the request's answer} from a _DumpRequests file."""
    return {(task, doc_id, idx): resp for task, rows in dump.items() for doc_id, idx, resp in rows}


def _offline_answers(out_dir: Path) -> dict:
    """The same from lm-eval's per-sample logs (--log_samples): a document's requests in idx order,
    each answer written as text (repr of the float: exact)."""

    def parsed(resp):
        if isinstance(resp, list):  # loglikelihood: [log-probability, is greedy]
            return [float(resp[0]), resp[1] == "True"]
        return float(resp)

    answers = {}
    for path in out_dir.rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            for idx, resps in enumerate(sample["resps"]):
                answers[(task, sample["doc_id"], idx)] = parsed(resps[0])
    return answers


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_in_loop_scores_equal_run_lm_eval_on_the_checkpoint_request_by_request(
    module_tiny_config, tp, tmp_path, monkeypatch
):
    """Two ranks: TP=1 (DP=2, the requests split over the DP ranks) and TP=2 (one DP rank)."""
    from dense_model.testing import spawn_workers

    monkeypatch.chdir(REPO)
    config, run_dir = module_tiny_config(
        f"parity_tp{tp}", *SHORT, *IN_LOOP, f"parallel.tensor_model_parallel_size={tp}"
    )
    code, out = train_in_workers(config, nproc=2, trainer=_DumpRequests())
    assert code == 0, out
    in_loop = json.loads((run_dir / "in_loop_requests.step6.rank0.json").read_text())
    assert json.loads((run_dir / "in_loop_requests.step6.rank1.json").read_text()) == in_loop  # all gathered
    spawn_workers(_offline_job, tp, str(run_dir / "checkpoints" / "iter_0000006"), str(tmp_path / "offline"))
    offline = _offline_answers(tmp_path / "offline")
    ours = _answers_by_request(in_loop)
    assert sorted(ours) == sorted(offline) and len(ours) > LIMIT
    for key, answer in ours.items():
        if isinstance(answer, list):  # loglikelihood: (log-probability, is greedy)
            assert abs(answer[0] - offline[key][0]) < 1e-5 and answer[1] == offline[key][1], key
        else:  # loglikelihood_rolling: the document's log-likelihood
            assert abs(answer - offline[key]) < 1e-5 * max(1.0, abs(offline[key])), key
    results = json.loads(next((tmp_path / "offline").rglob("results_*.json")).read_text())["results"]
    record = downstream_records(run_dir)[-1]
    assert record["downstream/tiny_python_mc/acc"] == results["tiny_python_mc"]["acc,none"]
    assert record["downstream/tiny_python_ppl/word_perplexity"] == pytest.approx(
        results["tiny_python_ppl"]["word_perplexity,none"], rel=1e-5
    )


@pytest.mark.slow
def test_the_dynamics_demo_config_logs_two_held_out_sets_and_its_task_and_plots_them(tmp_path, monkeypatch):
    """configs/demo_dynamics.yaml for four steps (the README's demo runs 150): both demo:SUBSET sets
    are the subset's documents the demo split keeps out of training, and plot_runs draws one panel
    per set and the in-loop task."""
    import sys

    import numpy as np

    from dense_model.data.demo import DEMO_SPLIT, demo_heldout_prefix
    from dense_model.data.gpt_dataset import split_matrix
    from dense_model.data.indexed import read_index_header

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("DENSE_MODEL_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "demo_dynamics"
    short = ["training.train_iters=4", "training.lr_warmup_iters=1", "checkpoint.save_interval=4"]
    short += ["logging.eval_interval=2", "logging.eval_iters=1", "evaluation.in_loop.interval=2"]
    short += ["evaluation.in_loop.limit=4", "data.num_workers=0", "training.micro_batch_size=4"]
    trained_ok(REPO / "configs" / "demo_dynamics.yaml", f"run_dir={run_dir}", *short)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("valid/wikipedia/ppl", "valid/github/ppl", "downstream/tiny_python_mc/acc"):
        assert [r["step"] for r in records if key in r] == [2, 4], key
    for subset in ("wikipedia", "github"):
        held_out = read_index_header(
            demo_heldout_prefix(subset, str(tmp_path / "cache" / "demo_data")) + ".idx"
        )
        source = read_index_header(
            str(tmp_path / "cache" / "demo_data" / f"redpajama_sample_{subset}_text_document.idx")
        )
        begin = int(round(split_matrix(DEMO_SPLIT)[1][0] * source.sequence_count))  # the first not trained on
        assert held_out.sequence_count == source.sequence_count - begin > 0
        assert np.array_equal(held_out.lengths(), source.lengths()[begin:])

    sys.path.insert(0, str(REPO / "scripts"))
    import matplotlib

    matplotlib.use("Agg")
    import plot_runs

    train, _ = plot_runs.read_run(run_dir)
    run = {"label": "demo", "train": train, "sets": plot_runs.read_named_sets(run_dir)}
    run["downstream"] = plot_runs.read_downstream(run_dir, train)
    _, drawn = plot_runs.plot_panels([run], None)
    assert {"wikipedia perplexity", "github perplexity", "tiny_python_mc/acc_norm"} <= set(drawn), sorted(
        drawn
    )
