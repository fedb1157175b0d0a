"""Shared pytest fixtures: small real tokenizers trained in the test session (no hub downloads), and
a small real mmap dataset (CPython's docs, tokenised by the session's SentencePiece model) written
with megatron-core's IndexedDatasetBuilder."""

from __future__ import annotations

import contextlib
import os
import sys
import time

import numpy as np
import pytest

from dense_model.testing import leftover_processes, python_docs_text, stop_fork_server, train_sentencepiece


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory) -> str:
    """Path to a real SentencePiece BPE model (vocab 512, byte fallback) trained on Python's docs."""
    # The corpus is Python's docs alone (code=False): the model the data and training tests were written for.
    return train_sentencepiece(
        tmp_path_factory.mktemp("spm"), "tok", code=False, model_type="bpe", byte_fallback=True
    )


@pytest.fixture(scope="session")
def mmap_dataset(tmp_path_factory, spm_model):
    """Prefix of an mmap dataset of CPython's docs (3000 paragraphs), for training runs."""
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    sp = spm.SentencePieceProcessor(model_file=spm_model)
    prefix = str(tmp_path_factory.mktemp("mmap") / "docs_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for paragraph in python_docs_text()[:3000]:
        ids = sp.encode(paragraph) + [sp.eos_id()]
        builder.add_document(np.array(ids, dtype=np.uint16), [len(ids)])
    builder.finalize(prefix + ".idx")
    return prefix


# The files with the longest tests (`pytest --durations`, 2-core machine, 2026-12-06): run first.
# The suite is spread over the workers by file (pytest-xdist --dist loadfile, in this order with
# --no-loadscope-reorder; xdist's own order puts files with many tests first, so these one-test
# minutes-long files came last and ran alone at the end). Only the order changes: a stale list costs
# time, not tests.
LONGEST_FIRST = (
    "tests/training/test_pretrain.py",
    "tests/studies/test_run_study.py",
    "tests/test_run_pretrain_demo.py",
    "tests/scripts/test_gpu_check.py",
    "tests/training/test_in_loop_eval.py",
    "tests/training/test_in_loop_layouts.py",
    "tests/training/test_checkpoint_load.py",
    "tests/training/test_pretrain_moe.py",
    "tests/evaluation/test_every_checkpoint.py",
    "tests/export/test_import_memory.py",
    "tests/evaluation/test_lm_eval_adapter.py",
    "tests/moe/test_moe_shared_activation.py",
    "tests/export/test_export_hf.py",
    "tests/training/test_schedule_change.py",
    "tests/export/test_import_hf.py",
    "tests/export/test_export_safety.py",
    "tests/export/test_export_olmoe.py",
    "tests/activations/kernels/test_polycom_bench_scripts.py",
)


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook; plain pytest runs without it
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one pytest worker more than this process's cores (``--maxprocesses`` still caps
    it). Most slow tests wait on the processes they start (a launcher, torchrun, gloo ranks, file
    locks) part of the time: on a 2-core machine (2026-12-05) 2 workers kept 1.87 cores busy on
    average over the whole suite, 3 workers 1.97."""
    return len(os.sched_getaffinity(0)) + 1


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    root = config.rootpath
    items.sort(key=lambda item: rank.get(item.path.relative_to(root).as_posix(), len(rank)))


# No test may leave a process behind. At the session's end every pytest process (each xdist worker,
# and the controller or a plain pytest) stops its fork server and looks for processes still alive:
# its descendants, and (the controller, or a plain pytest, once the workers are gone) orphans that
# started since pytest did and name this checkout or its venv. Any found fail the run (exit 1),
# are listed, and are killed. Seconds to let a process that is already exiting finish:
LEFTOVER_GRACE_S = 15.0


def leftover_names(config) -> list[str]:
    """What an orphan's command line names to count as the tests': this checkout or its venv."""
    return [str(config.rootpath), sys.prefix]


def pytest_sessionstart(session):
    import psutil

    # psutil's clock (boot time + ticks), as the start times it is compared with; from pytest's start
    session.config._leftover_since = psutil.Process().create_time()
    session.config._leftovers = []  # the workers' reports, in the controller


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook
def pytest_testnodedown(node, error):
    node.config._leftovers.extend(getattr(node, "workeroutput", {}).get("leftover_processes", []))


@pytest.hookimpl(trylast=True)  # after pytest-xdist has shut its workers down
def pytest_sessionfinish(session):
    import psutil

    from dense_model.procutil import kill_process_tree

    config = session.config
    if not hasattr(config, "_leftover_since"):  # the session never started
        return
    worker = hasattr(config, "workerinput")
    stop_fork_server()
    names = leftover_names(config)
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while (
        left := leftover_processes(config._leftover_since, names, orphans=not worker)
    ) and time.monotonic() < deadline:
        time.sleep(0.5)
    lines = []
    for proc in left:
        with contextlib.suppress(psutil.Error):
            lines.append(f"pid {proc.pid} (parent {proc.ppid()}): {' '.join(proc.cmdline())[:300]}")
            kill_process_tree(proc.pid, timeout=10)
    if worker:
        config.workeroutput["leftover_processes"] = lines
        return
    lines = config._leftovers + lines
    if lines:
        report = config.pluginmanager.get_plugin("terminalreporter")
        write = report.write_line if report else lambda line: print(line, file=sys.stderr)
        write(f"error: {len(lines)} process(es) the tests started were still alive at the end (killed now):")
        for line in lines:
            write("  " + line)
        if session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
