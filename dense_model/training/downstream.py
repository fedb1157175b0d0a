"""Downstream (lm-eval) tasks scored on the live model inside the training loop: ``evaluation.in_loop``.

    evaluation.in_loop: {tasks: [tiny_python_mc], interval: 50, limit: 30, include_path: examples/lm_eval_tasks}

The tasks are built once, when the trainer starts (``load_tasks``; the launcher builds them too, to
refuse an unknown task or one whose data is neither local nor cached before anything starts). Every
``interval`` steps ``InLoopEvaluator.evaluate`` runs lm-eval's own ``evaluate`` on them with
``MegatronLM`` over the trainer's model (no export, no reload): lm-eval builds the requests as
``run_lm_eval.sh`` does (same ``limit``, ``num_fewshot`` and seeds), each data-parallel rank scores
every DP-size-th request, the answers are gathered over the DP group, and every rank computes the
same metrics. TP ranks of one DP rank take the same requests and cooperate in each forward; so do
the pipeline stages of one DP rank (``lm_scoring``: each stage sends its output on, the last one's
answers are broadcast to the pipeline). Under expert parallelism a forward's all-to-all spans the DP
ranks of an expert group, but the ranks have different numbers of forwards: they run in lockstep
(``DataParallelLM``), a rank done with its share running a one-token forward while another has work.

It changes nothing of training: the model is put back in train mode, every random state lm-eval or
the forward could touch (Python, NumPy, torch CPU and CUDA, megatron-core's tracker) is restored,
and no data iterator is read. Offline, as ``run_lm_eval.sh``: HF_DATASETS_OFFLINE and HF_HUB_OFFLINE
are 1 unless set.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random

import numpy as np
import torch

from dense_model import collectives
from dense_model.config import ConfigError


def _offline() -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


_offline()  # before lm-eval imports datasets and huggingface_hub, which read these at import

from dense_model.training.lm_scoring import MegatronLM  # noqa: E402

# lm-eval's defaults for ``lm-eval run`` (``--seed 0,1234,1234,1234``): the requests and few-shot
# examples drawn here are then the ones run_lm_eval.sh draws.
RANDOM_SEED, NUMPY_SEED, TORCH_SEED, FEWSHOT_SEED = 0, 1234, 1234, 1234


class TaskSetupError(ConfigError):
    """A task that cannot be built here: its message is one line naming the task and the fix."""


def load_tasks(in_loop) -> dict:
    """lm-eval's ``TaskManager.load`` of ``in_loop.tasks`` ({"tasks", "groups", "group_map"}), with
    ``num_fewshot`` and the few-shot seed set as lm-eval's ``simple_evaluate`` sets them. Raises
    TaskSetupError for a task lm-eval does not know or whose dataset cannot be read offline."""
    _offline()
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    from lm_eval.tasks import TaskManager

    names = list(in_loop.tasks)
    manager = TaskManager(
        include_path=in_loop.include_path,
        include_defaults=not local_tasks_only(names, in_loop.include_path),
    )
    unknown = [n for n in names if n not in manager.task_index]
    if unknown:
        raise TaskSetupError(
            f"evaluation.in_loop.tasks: lm-eval does not know {', '.join(unknown)}; list the known ones with "
            "`lm-eval ls tasks`, and give the folder of local YAML tasks as evaluation.in_loop.include_path "
            "(e.g. examples/lm_eval_tasks)"
        )
    try:
        loaded = manager.load(names)
    except Exception as err:  # noqa: BLE001 - datasets/hub errors have many types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise TaskSetupError(
            f"evaluation.in_loop.tasks: {', '.join(names)} cannot be built offline ({type(err).__name__}: "
            f"{first}); a task's dataset must be a local file or already in the Hugging Face cache: fill the "
            "cache on a machine with network (HF_DATASETS_OFFLINE=0, see examples/lm_eval_tasks/README.md) "
            "or use a local task"
        ) from None
    for task in loaded["tasks"].values():  # as simple_evaluate does
        if in_loop.num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=in_loop.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
    return loaded


def local_tasks_only(names: list[str], include_path: str | None) -> bool:
    """True when every name is a plain task found under ``include_path``: lm-eval may then index that
    folder alone instead of its ~14,000 built-in task files (about 12 s on a 2-core machine)."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    if include_path is None or not names:
        return False
    index = TaskManager(include_path=include_path, include_defaults=False).task_index
    return all(index.get(n) is not None and index[n].kind in (Kind.TASK, Kind.PY_TASK) for n in names)


@contextlib.contextmanager
def random_states_kept():
    """Every random state an evaluation could draw from is as it was afterwards."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    saved = (
        random.getstate(),
        np.random.get_state(),
        torch.get_rng_state(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        tracker.get_states(),
    )
    try:
        yield
    finally:
        py, npy, cpu, cuda, tracked = saved
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        tracker.set_states(tracked)


@contextlib.contextmanager
def _no_request_bars():
    """lm-eval draws a progress bar while it builds each task's requests, on every rank, with no way
    to turn it off: none in the training log."""
    import lm_eval.api.task as task_module

    bar = task_module.tqdm
    task_module.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = bar


class DataParallelLM(MegatronLM):
    """MegatronLM whose request lists are split over the data-parallel group: DP rank r scores
    requests r, r + DP, ...; the answers are gathered, so every rank returns all of them in order.

    At PP > 1 the answers of a pipeline are its last stage's. With ``lockstep`` (expert parallelism:
    the MoE layers' token exchange spans DP ranks) every forward is preceded by a sum over all ranks of
    "I have a forward to run"; a rank whose share is done answers 0 and runs a one-token forward while
    the sum is not 0, so every rank enters every collective. The whole world takes part: the TP ranks
    and pipeline stages of one DP rank always agree, and one group is simpler than the expert groups
    of each stage."""

    def __init__(self, *args, dp_group=None, lockstep: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.dp_group = dp_group
        self.dp_rank = torch.distributed.get_rank(dp_group) if torch.distributed.is_initialized() else 0
        self.dp_size = torch.distributed.get_world_size(dp_group) if torch.distributed.is_initialized() else 1
        self.lockstep = lockstep

    def _forward(self, tokens, first_position, cache=None):
        if self.lockstep:
            self._anyone_running(True)
        return super()._forward(tokens, first_position, cache)

    def _anyone_running(self, mine: bool) -> bool:
        flag = torch.tensor([1 if mine else 0], dtype=torch.int64)
        return int(collectives.sum_over_group(flag)[0]) > 0

    def _join(self) -> None:
        """This rank's share is done: one-token forwards (their output unused) until everyone's is."""
        idle = torch.full((1, 1), self.eot_token_id, dtype=torch.long)
        while self._anyone_running(False):
            MegatronLM._forward(self, idle, 0)

    def _sharded(self, method, requests):
        mine = requests[self.dp_rank :: self.dp_size]
        share = method(mine) if mine else []
        if self.lockstep:
            self._join()
        if self.pipeline_group is not None:  # the other stages hold placeholders
            share = collectives.broadcast_object(share, self.last_stage_rank, self.pipeline_group)
        gathered = collectives.all_gather_objects(share, self.dp_group)
        answers = [None] * len(requests)
        for rank, part in enumerate(gathered):
            answers[rank :: self.dp_size] = part
        return answers

    def loglikelihood(self, requests, disable_tqdm: bool = True):
        return self._sharded(lambda r: MegatronLM.loglikelihood(self, r, disable_tqdm=True), requests)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = True):
        return self._sharded(lambda r: MegatronLM.loglikelihood_rolling(self, r, disable_tqdm=True), requests)

    def generate_until(self, requests, disable_tqdm: bool = True):
        return self._sharded(lambda r: MegatronLM.generate_until(self, r, disable_tqdm=True), requests)


def metric_values(results: dict) -> dict[str, float]:
    """{"TASK/METRIC": value} from lm-eval's results: numbers only, no standard errors; a metric
    under a filter other than "none" is METRIC_FILTER (exact_match,strip -> exact_match_strip)."""
    values = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or isinstance(value, bool):
                continue
            if not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            values[f"{task}/{name}"] = float(value)
    return values


class InLoopEvaluator:
    """The in-loop tasks and the model they are scored on; ``evaluate()`` on every rank at once."""

    def __init__(self, cfg, model, tokenizer, tasks: dict):
        from megatron.core import parallel_state as ps

        self.in_loop = cfg.evaluation.in_loop
        self.model = model  # the GPTModel (not the DDP wrapper): train()/eval() reach the same modules
        self.tasks = tasks
        self.lm = DataParallelLM(
            model,
            cfg,
            tokenizer,
            batch_size=self.in_loop.batch_size,
            dp_group=ps.get_data_parallel_group(),
            # the MoE layers' collectives span the expert TP x EP ranks: beyond one DP rank's TP ranks?
            lockstep=ps.get_expert_tensor_and_model_parallel_world_size()
            > ps.get_tensor_model_parallel_world_size(),
        )

    def evaluate(self) -> dict[str, float]:
        """{"TASK/METRIC": value}, the same on every rank; the model back in train mode after."""
        from lm_eval.evaluator import evaluate

        for task in self.tasks["tasks"].values():
            task.set_fewshot_seed(seed=FEWSHOT_SEED)  # each evaluation draws the same few-shot examples
        was_training = self.model.training
        self.model.eval()
        try:
            with random_states_kept(), torch.no_grad(), _no_request_bars():
                random.seed(RANDOM_SEED)
                np.random.seed(NUMPY_SEED)
                torch.manual_seed(TORCH_SEED)
                results = evaluate(
                    lm=self.lm,
                    task_dict=self.tasks,
                    limit=self.in_loop.limit,
                    bootstrap_iters=0,
                    log_samples=False,
                )
        finally:
            self.model.train(was_training)
        return metric_values(results or {})
