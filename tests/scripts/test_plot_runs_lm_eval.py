"""scripts/plot_runs.py's downstream points of a study run also scored with --every-checkpoint: one
point per iteration (the study's final results and --every-checkpoint's of the same iteration do not
make two), the --every-checkpoint series' score where they differ (said on stderr), and nothing from
a job's staging or set-aside folders (unpublished, possibly a killed job's)."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _results(folder: Path, iteration: int, acc: float, stamp: str | None = None) -> None:
    data = {
        "results": {"hellaswag": {"acc_norm,none": acc, "acc_norm_stderr,none": 0.01}},
        "config": {"dense_model_iteration": iteration},
    }
    if stamp:
        data[stamp] = {"iteration": iteration}
    folder.mkdir(parents=True)
    (folder / "results_2026-12-06T00-00-00.json").write_text(json.dumps(data))


def test_one_point_per_iteration_and_nothing_unpublished(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import plot_runs

    run = tmp_path / "run"
    train = {step: {"step": step, "tokens": step * 1000, "loss": 5.0} for step in range(1, 21)}
    eval_dir = run / "lm_eval"
    _results(eval_dir / "dense_model", 20, 0.40, "dense_model_study")  # the study's, at its last step
    for n, acc in ((10, 0.30), (20, 0.41)):  # --every-checkpoint's series (another --limit at 20)
        _results(eval_dir / f"iter_{n:07d}" / "dense_model", n, acc, "dense_model_every_checkpoint")
    _results(eval_dir / ".iter_0000015.tmp-0123456789abcdef0123456789abcdef" / "dense_model", 15, 0.9)
    _results(eval_dir / ".iter_0000010.old" / "dense_model", 10, 0.8)
    _results(eval_dir / ".iter_0000020.tmp-node1-4242" / "dense_model", 20, 0.7)  # an earlier version's

    points = plot_runs.read_downstream(run, train)
    assert points == {
        "hellaswag/acc_norm": {10: {"tokens": 10_000, "score": 0.30}, 20: {"tokens": 20_000, "score": 0.41}}
    }
    err = capsys.readouterr().err
    assert "hellaswag/acc_norm at iteration 20 is 0.41" in err and "has 0.4 (other tasks or options?)" in err
