"""A resumed run's metrics.jsonl: records past the resume step move to metrics.attempt-K.jsonl."""

import json

from dense_model.training.metrics import set_aside_records_after


def write(path, steps, torn=False):
    lines = [json.dumps({"step": s, "loss": float(s)}) + "\n" for s in steps]
    path.write_text("".join(lines) + ('{"step": 1' if torn else ""))


def steps_in(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_each_resume_sets_its_killed_attempt_aside(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert set_aside_records_after(metrics, 0) is None  # a first start: nothing there
    write(metrics, [1, 2, 3, 4, 5, 6], torn=True)  # killed mid-line after step 6; checkpoint at 4
    aside = set_aside_records_after(metrics, 4)
    assert aside == tmp_path / "metrics.attempt-1.jsonl"
    assert steps_in(metrics) == [1, 2, 3, 4]
    assert aside.read_text().splitlines()[:2] == [json.dumps({"step": s, "loss": float(s)}) for s in (5, 6)]
    assert aside.read_text().splitlines()[2] == '{"step": 1'  # the torn line, kept but out of the way
    with open(metrics, "a") as f:  # the second attempt logs 5..8, is killed; checkpoint at 6
        f.writelines(json.dumps({"step": s, "loss": -s}) + "\n" for s in (5, 6, 7, 8))
    second = set_aside_records_after(metrics, 6)
    assert second == tmp_path / "metrics.attempt-2.jsonl" and steps_in(second) == [7, 8]
    assert steps_in(metrics) == [1, 2, 3, 4, 5, 6]
    assert set_aside_records_after(metrics, 6) is None  # nothing past 6 any more
