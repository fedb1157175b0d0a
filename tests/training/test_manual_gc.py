"""Manual garbage collection (``training.manual_gc``, Megatron-LM's --manual-gc). Every collection
is counted through ``gc.callbacks`` (Python calls them at the start of each collection, automatic
or explicit, with its generation): with manual collection none happens inside a training step or an
evaluation, the explicit ones come exactly at the loop's fixed points, and the automatic collector
is on again after the loop, also when the loop ends by an exception."""

import gc
import json

import pytest

from dense_model.training.manual_gc import ManualGC, manual_gc_wanted


@pytest.fixture
def collections():
    """The generations of the collections that start while the test runs, in order."""
    seen = []

    def record(phase, info):
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(record)
    yield seen
    gc.callbacks.remove(record)


def test_auto_is_on_gpus_only():
    assert manual_gc_wanted("auto", "cuda") and not manual_gc_wanted("auto", "cpu")
    assert manual_gc_wanted(True, "cpu") and not manual_gc_wanted(False, "cuda")


def test_collections_at_the_fixed_points_only(collections):
    assert gc.isenabled()
    control = ManualGC(True, interval=2)
    with control:
        assert not gc.isenabled()
        assert collections == [2]  # the full collection on entry
        for step in range(1, 6):
            garbage = [[] for _ in range(5000)]  # 5000 container allocations: over the threshold
            for x in garbage:
                x.append(x)  # cycles: only a collection frees them
            del garbage
            control.step(step)
        assert collections == [2, 2, 2]  # steps 2 and 4, none automatic
        with control.around():
            assert collections == [2, 2, 2, 2]
        assert collections == [2, 2, 2, 2, 0]
    assert gc.isenabled()


def test_disabled_control_leaves_the_collector_alone(collections):
    control = ManualGC(False, interval=1)
    with control:
        assert gc.isenabled()
        control.step(1)
        with control.around():
            pass
    assert gc.isenabled() and collections == []


def test_the_collector_is_restored_after_an_exception():
    with pytest.raises(KeyboardInterrupt):
        with ManualGC(True, interval=0) as control:
            with control.around():
                raise KeyboardInterrupt
    assert gc.isenabled()
    gc.disable()  # a collector that was off on entry stays off
    try:
        with pytest.raises(RuntimeError):
            with ManualGC(True):
                raise RuntimeError("boom")
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_negative_interval_is_refused():
    with pytest.raises(ValueError, match="training.manual_gc_interval must be >= 0"):
        ManualGC(True, interval=-1)


# ------------------------------------------------------------------------------------------
# The trainer: pretrain.main, one gloo rank, 4 steps; evaluation and a save every 2 steps.

STEPS = ["training.train_iters=4", "logging.eval_interval=2", "checkpoint.save_interval=2"]


def _recording_trainer(base, phase, events, nan_at=None):
    """The trainer ``base``, tagging each collection with the part of the loop it started in."""
    import torch

    class Recording(base):
        def fit(self):
            phase[0] = "fit"
            try:
                return super().fit()
            finally:
                events.append(["enabled after fit", gc.isenabled()])
                phase[0] = "build"  # main's clean-up is not recorded

        def _in_phase(self, name, call, after):
            """Run ``call`` recorded as ``name``; afterwards the phase is ``after()``."""
            phase[0] = name
            out = call()
            phase[0] = after()
            return out

        def train_step(self):
            return self._in_phase(
                "step", super().train_step, lambda: f"after step {self.state.iteration + 1}"
            )

        def _forward_backward(self):
            loss = super()._forward_backward()
            if nan_at == self.state.iteration + 1:
                loss = torch.full_like(loss, float("nan"))  # nan_policy=stop: TrainingDiverged
            return loss

        def evaluate(self):
            return self._in_phase("eval", super().evaluate, lambda: f"after eval {self.state.iteration}")

        def save(self):
            self._in_phase("save", super().save, lambda: f"after save {self.state.iteration}")

    return Recording


def _train_three_ways(rank, world_size, config, root, out_file):
    import contextlib
    import io

    from dense_model.training import pretrain

    phase, results = ["build"], {}

    def record(when, info):
        if when == "start" and phase[0] != "build":
            results[current][1].append([phase[0], info["generation"]])

    gc.callbacks.append(record)
    base = pretrain.Trainer
    for current, overrides, nan_at in [
        ("manual", ["training.manual_gc=true", "training.manual_gc_interval=3"], None),
        ("automatic", ["training.manual_gc=false"], None),
        ("manual, NaN at step 2", ["training.manual_gc=true"], 2),
    ]:
        results[current] = [None, []]
        phase[0] = "build"
        pretrain.Trainer = _recording_trainer(base, phase, results[current][1], nan_at)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = pretrain.main(
                [config, *STEPS, f"run_dir={root}/run{len(results)}", "checkpoint.fresh=true", *overrides]
            )
        phase[0] = "build"
        results[current][0] = [code, gc.isenabled(), out.getvalue()[-2000:]]
    pretrain.Trainer = base
    with open(out_file, "w") as f:
        json.dump(results, f)


@pytest.mark.slow
def test_trainer_collects_only_between_steps(tiny_config, tmp_path):
    """One gloo rank, three runs of pretrain.main in one process:

    - manual_gc=true, interval 3: the collections are exactly the entry's (full), before (full) and
      after (youngest) each evaluation and save, and step 3's (full); none inside a step, an
      evaluation or a save; the collector is on again after the run;
    - manual_gc=false: Python's automatic collector runs inside the steps and saves (what manual
      collection takes out of them);
    - manual_gc=true with a NaN loss at step 2 (nan_policy=stop raises inside the loop): exit 1,
      and the collector is on again."""
    from dense_model.testing import spawn_workers

    config, _ = tiny_config("gc", "training.global_batch_size=2", "logging.eval_iters=1")
    out_file = tmp_path / "gc.json"
    spawn_workers(_train_three_ways, 1, str(config), str(tmp_path), str(out_file))
    results = json.loads(out_file.read_text())

    (code, enabled, out), events = results["manual"]
    assert code == 0 and enabled, out
    assert [tuple(e) for e in events] == [
        ("fit", 2),  # entering the loop
        ("after step 2", 2),  # before the evaluation
        ("after eval 2", 0),  # after it
        ("after eval 2", 2),  # before the save
        ("after save 2", 0),  # after it
        ("after step 3", 2),  # manual_gc_interval=3
        ("after step 4", 2),
        ("after eval 4", 0),
        ("after eval 4", 2),
        ("after save 4", 0),
        ("enabled after fit", True),
    ], out

    (code, enabled, out), events = results["automatic"]
    assert code == 0 and enabled, out
    # Python's collector inside the steps, evaluations and saves (31 on 2026-12-05: one in step 1,
    # the rest in the two saves, which allocate many more objects than this tiny model's steps).
    inside = [e for e in events if e[0] in ("step", "eval", "save")]
    assert len(inside) >= 5, events
    assert events[-1] == ["enabled after fit", True]

    (code, enabled, out), events = results["manual, NaN at step 2"]
    assert code == 1 and "step 2: the loss is NaN or Inf" in out, out
    assert enabled and events[-1] == ["enabled after fit", True]
    assert [tuple(e) for e in events[:-1]] == [("fit", 2)]  # nothing inside steps 1 and 2
