"""In-loop downstream evaluation at the layouts whose forward spans more than the TP ranks of one DP
rank: PP=2 (the stages of a pipeline pass each forward on), a MoE model at EP=2 (the DP ranks'
forwards in lockstep), both at once on 4 ranks, and TP=2 with sequence parallelism (each forward
padded to a multiple of TP). (A MoE model at TP=2 with EP=2 cannot train over gloo: megatron-core's
all-to-all dispatcher all-gathers shards of different sizes over the TP ranks, which gloo refuses.)
At each, on the trainer's gloo ranks, the in-loop answers equal run_lm_eval's on the checkpoint of the
same step (loaded at PP=1, TP=1), request by request: log-likelihoods within 1e-5, generations
(greedy, without a KV cache at PP=2 and under sequence parallelism) the same text; and at EP=2 the
training losses are bitwise those of a run without in-loop evaluation."""

import json
from pathlib import Path

import pytest

from dense_model.launcher import main as launcher_main
from dense_model.testing import spawn_workers
from tests.training.pretrain_jobs import REPO, read_metrics, train_in_workers, trained_ok
from tests.training.test_in_loop_eval import (
    IN_LOOP,
    SHORT,
    TASKS,
    _answers_by_request,
    _DumpRequests,
    _offline_answers,
    downstream_records,
)
from tests.training.test_pretrain_moe import MOE

# Two steps, the tasks scored after each (the second's on the checkpoint of step 2), dropout on:
# the step-2 loss would show an evaluation that changed the model or a random state.
DOCS = 5  # documents per task: an odd number, so that the DP ranks' shares differ
STEPS = [  # after SHORT and IN_LOOP
    "training.train_iters=2",
    "training.lr_warmup_iters=1",
    "evaluation.in_loop.interval=1",
    f"evaluation.in_loop.limit={DOCS}",
]
GEN_TASK = "tiny_python_gen"
TASKS_WITH_GEN = ["evaluation.in_loop.tasks=[tiny_python_mc,tiny_python_ppl,tiny_python_gen]"]
EP2 = [*MOE, "parallel.expert_model_parallel_size=2"]
LAYOUTS = {
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
    # two requests per forward: the DP ranks' shares of 5 documents take different numbers of forwards
    # (3 and 2 rolling windows, generation batches), which the lockstep must even out
    "ep2": [*EP2, "evaluation.in_loop.batch_size=2"],
    "tp2_sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    # 4 ranks: the lockstep's idle forwards pass through the pipeline too
    "pp2_ep2": [*EP2, "evaluation.in_loop.batch_size=2", "parallel.pipeline_model_parallel_size=2"],
}
RANKS = {"pp2_ep2": 4}  # 2 for the others


@pytest.fixture(scope="module")
def in_loop_runs(module_tiny_config):
    """{layout: run_dir} of a 2-step run at the layout with the tasks scored in the loop."""
    runs = {}

    def run(layout):
        if layout not in runs:
            config, run_dir = module_tiny_config(
                layout, *SHORT, *IN_LOOP, *TASKS_WITH_GEN, *STEPS, *LAYOUTS[layout]
            )
            code, out = train_in_workers(config, nproc=RANKS.get(layout, 2), trainer=_DumpRequests())
            assert code == 0, out
            runs[layout] = run_dir
        return runs[layout]

    return run


def _offline_job(rank, world_size, checkpoint, out_dir):
    """run_lm_eval.sh's module on one checkpoint (PP=1, TP = world size), the generation task too."""
    from dense_model.evaluation.run import main

    tasks = "tiny_python_mc,tiny_python_ppl," + GEN_TASK
    code = main(
        [checkpoint, tasks, "--include_path", str(TASKS), "--limit", str(DOCS)]
        + ["--log_samples", "--output_path", out_dir]
    )
    assert code == 0


def _offline_generations(out_dir: Path) -> dict:
    """{(GEN_TASK, doc_id, 0): generated text} from lm-eval's per-sample log, which is then removed
    (``_offline_answers`` reads the log-likelihood tasks' logs)."""
    answers = {}
    for path in out_dir.rglob(f"samples_{GEN_TASK}_*.jsonl"):
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            answers[(GEN_TASK, sample["doc_id"], 0)] = sample["resps"][0][0]
        path.unlink()
    return answers


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_in_loop_scores_at_the_layout_equal_run_lm_eval_request_by_request(
    in_loop_runs, layout, tmp_path, monkeypatch
):
    monkeypatch.chdir(REPO)
    run_dir = in_loop_runs(layout)
    in_loop = json.loads((run_dir / "in_loop_requests.step2.rank0.json").read_text())
    for rank in range(1, RANKS.get(layout, 2)):  # all gathered: every rank has every answer
        assert json.loads((run_dir / f"in_loop_requests.step2.rank{rank}.json").read_text()) == in_loop
    offline_dir = tmp_path / "offline"
    spawn_workers(_offline_job, 1, str(run_dir / "checkpoints" / "iter_0000002"), str(offline_dir))
    offline = {**_offline_generations(offline_dir), **_offline_answers(offline_dir)}
    ours = _answers_by_request(in_loop)
    assert sorted(ours) == sorted(offline) and len(ours) > DOCS
    for key, answer in ours.items():
        if key[0] == GEN_TASK:
            assert answer == offline[key], key
        elif isinstance(answer, list):  # loglikelihood: (log-probability, is greedy)
            assert abs(answer[0] - offline[key][0]) < 1e-5 and answer[1] == offline[key][1], key
        else:  # loglikelihood_rolling: the document's log-likelihood
            assert abs(answer - offline[key]) < 1e-5 * max(1.0, abs(offline[key])), key
    assert [r["step"] for r in downstream_records(run_dir)] == [1, 2]


@pytest.mark.slow
def test_in_loop_evaluation_at_ep2_changes_no_training_loss(in_loop_runs, module_tiny_config, monkeypatch):
    """The MoE forwards of the evaluation (eval mode, no grad, the trainer's MoEMonitor paused) add to
    no router loss or expert-load count."""
    monkeypatch.chdir(REPO)
    config, plain_dir = module_tiny_config("ep2_plain", *SHORT, *STEPS, *EP2)
    trained_ok(config, nproc=2)
    assert read_metrics(in_loop_runs("ep2"))[0] == read_metrics(plain_dir)[0]  # bitwise: the same floats
    with_eval, without = _router_losses(in_loop_runs("ep2")), _router_losses(plain_dir)
    assert len(with_eval) == 2 and with_eval == without


def _router_losses(run_dir: Path) -> dict:
    """{step: (router losses, expert load)} of the training records: megatron-core's aux-loss tracker
    and our MoEMonitor's statistics, both of training forwards only."""
    keys = ("moe_aux_loss", "moe_z_loss", "expert_load_min", "expert_load_max", "expert_load_entropy")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: tuple(r[k] for k in keys) for r in records if "loss" in r}


def test_what_in_loop_evaluation_still_refuses_is_one_line_before_launch(tiny_config, capsys):
    """A MoE layout whose in-loop forwards would differ from the offline ones: exit 2, nothing written."""
    tasks = "evaluation.in_loop.tasks=[tiny_python_mc]"
    cases = [
        (
            [*EP2, "model.moe.token_dispatcher=allgather"],
            "evaluation.in_loop.tasks is set but model.moe.token_dispatcher=allgather at "
            "parallel.expert_model_parallel_size=2: ",
        ),
        (
            [*EP2, "model.moe.capacity_factor=1.5"],
            "evaluation.in_loop.tasks is set but model.moe.capacity_factor=1.5 with "
            "parallel.expert_model_parallel_size=2: ",
        ),
        (
            [*MOE, *LAYOUTS["tp2_sp"], "model.moe.capacity_factor=1.5"],
            "evaluation.in_loop.tasks is set but model.moe.capacity_factor=1.5 with parallel.sequence_parallel=true: ",
        ),
    ]
    for i, (extra, said) in enumerate(cases):
        config, run_dir = tiny_config(f"refused{i}", tasks, *extra)
        assert launcher_main([str(config), "--world-size", "2"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("config error: " + said), err
        assert len(err.splitlines()) == 1, err
        assert not run_dir.exists()
