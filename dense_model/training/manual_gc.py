"""Python's garbage collector under the trainer's control (``training.manual_gc``), as Megatron-LM's
``--manual-gc``: the automatic collector pauses the process whenever enough container objects have
been allocated, i.e. at a different moment on every rank, and a step's collectives then wait for
the slowest rank. With manual collection the automatic collector is off while the loop runs and
every rank collects at the same points:

- entering the loop: ``gc.disable()`` then a full ``gc.collect()`` (Megatron-LM's order; no
  ``gc.freeze()``, which Megatron-LM does not do either);
- every ``training.manual_gc_interval`` steps, after the step's logging, evaluation and save
  (0, the default as in Megatron-LM, means never between steps);
- before an evaluation or a checkpoint save a full collection, after it one of the youngest
  generation only (what the evaluation or the save left behind); Megatron-LM does this around
  evaluation (``--manual-gc-eval``, on by default), here checkpoint saves get the same;
- leaving the loop, normally or by an exception: the collector is as it was on entry.

    gc_control = ManualGC(manual_gc_wanted(t.manual_gc, "cuda"), t.manual_gc_interval)
    with gc_control:
        for step in ...:
            ...
            with gc_control.around():
                evaluate()
            gc_control.step(step)
"""

from __future__ import annotations

import contextlib
import gc


def manual_gc_wanted(setting, device_type: str) -> bool:
    """Whether ``training.manual_gc`` (auto, true, false) turns manual collection on for a model on
    ``device_type``: auto = on GPUs only (the CPU runs, tests and demos, keep Python's default)."""
    if setting == "auto":
        return device_type == "cuda"
    return bool(setting)


class ManualGC:
    """A context manager: inside it (when ``enabled``) the automatic collector is off; ``step``
    and ``around`` collect at the loop's fixed points. Disabled, every method does nothing."""

    def __init__(self, enabled: bool, interval: int = 0):
        if interval < 0:
            raise ValueError(f"training.manual_gc_interval must be >= 0, got {interval}")
        self.enabled, self.interval = enabled, interval
        self._active = False
        self._was_enabled = True

    def __enter__(self) -> ManualGC:
        if self.enabled:
            if self._active:
                raise RuntimeError("ManualGC is already active (it does not nest)")
            self._was_enabled = gc.isenabled()
            gc.disable()
            self._active = True
            gc.collect()
        return self

    def __exit__(self, *exc) -> None:
        if self._active:
            self._active = False
            if self._was_enabled:
                gc.enable()

    def step(self, iteration: int) -> None:
        """After step ``iteration``: a full collection every ``interval`` steps."""
        if self._active and self.interval and iteration % self.interval == 0:
            gc.collect()

    @contextlib.contextmanager
    def around(self):
        """Around an evaluation or a checkpoint save: a full collection before, the youngest
        generation after (skipped when the body raises: the loop is ending anyway)."""
        if self._active:
            gc.collect()
        yield
        if self._active:
            gc.collect(generation=0)
