"""Worker processes: each takes whole shards in the dispatch order and tokenises them (`shard.py`);
only small counters travel back."""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sys
import threading
import traceback
from contextlib import contextmanager

import dense_model.data.preprocess.shard as shard
from dense_model.data.jsonl import BadLineError
from dense_model.data.preprocess.config import Terminated
from dense_model.data.preprocess.plan import ShardSpec
from dense_model.data.preprocess.progress import Progress
from dense_model.data.preprocess.shard import ShardContext
from dense_model.data.tokenizers import build_tokenizer
from dense_model.procutil import die_with_parent


def _raise_terminated(signum, _frame) -> None:
    """Once: the clean-up it starts is not cut short by a second SIGTERM (a job's whole process group
    gets one, and a worker another from its parent's stop)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated(signum)


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises `Terminated` (a KeyboardInterrupt) in the main thread, once. Elsewhere than the
    main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def worker_main(wid: int, parent_pid: int, ctx_args: dict, pending, taken, results) -> None:
    if not die_with_parent(parent_pid):  # the parent died before we asked
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    signal.signal(signal.SIGTERM, _raise_terminated)  # the parent's stop: the shard's temporaries go
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    current = None
    try:
        tokenizer = build_tokenizer(ctx_args.pop("tokenizer_type"), ctx_args.pop("tokenizer_model"))
        ctx = ShardContext(tokenizer=tokenizer, **ctx_args)
        while True:
            with taken.get_lock():  # the next shard nobody took yet
                n = taken.value
                taken.value += 1
            if n >= len(pending):
                results.put(("exit", wid))
                return
            spec = pending[n]
            current = spec.id
            results.put(("start", wid, spec.id))
            result = shard.process_shard(spec, ctx, lambda *counts: results.put(("progress", wid, *counts)))
            results.put(("done", wid, result))
    except Terminated:  # stopped (the shard's writers removed their files): nothing to report
        results.cancel_join_thread()
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent
        try:
            import pickle

            pickle.dumps(err)
        except Exception:
            err = RuntimeError(f"{type(err).__name__}: {err}")
        results.put(("error", wid, current, err, traceback.format_exc()))


def start_method() -> str:
    """How worker processes start: "fork" (in milliseconds; spawn re-imports numpy and the tokenizer,
    ~0.2 s of CPU each, 5% of a 2-core run on 40 MB) where it is safe, on Linux while this process
    runs no other thread; else "spawn". Workers then see this module as imported afresh: whatever a
    caller patched in this process reaches them only with fork."""
    return "fork" if sys.platform == "linux" and threading.active_count() == 1 else "spawn"


def run_pool(
    pending: list[ShardSpec], workers: int, ctx_args: dict, progress: Progress, on_start, on_done
) -> None:
    mp = multiprocessing.get_context(start_method())
    # The shards go to every worker with its arguments; a shared counter hands them out. (A task queue
    # would leave a feeder thread in this process, after which a later pool could no longer fork.)
    taken, results = mp.Value("l", 0), mp.Queue()
    procs = [
        mp.Process(
            target=worker_main, args=(i, os.getpid(), dict(ctx_args), pending, taken, results), daemon=True
        )
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    progress.begin()
    on_start()  # may start threads: the workers are forked
    current: dict[int, str] = {}
    exited: set[int] = set()
    remaining = len(pending)
    try:
        while remaining:
            try:
                msg = results.get(timeout=0.5)
            except queue.Empty:
                progress.maybe_log()
                for wid, p in enumerate(procs):
                    if wid not in exited and p.exitcode is not None:
                        # Died without a word: killed (OOM?) or crashed in native code.
                        raise RuntimeError(
                            f"worker {wid} died (exit code {p.exitcode}) while processing shard "
                            f"{current.get(wid, '?')}; finished shards are kept, rerun the same command to resume."
                        ) from None
                continue
            kind = msg[0]
            if kind == "progress":
                progress.update(*msg[2:])
            elif kind == "start":
                current[msg[1]] = msg[2]
            elif kind == "done":
                remaining -= 1
                current.pop(msg[1], None)
                on_done(msg[2])
            elif kind == "exit":
                exited.add(msg[1])
            elif kind == "error":
                _, wid, shard_id, err, tb = msg
                if isinstance(err, BadLineError | KeyboardInterrupt):
                    raise err
                raise RuntimeError(f"worker {wid} failed on shard {shard_id}:\n{tb}") from err
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: the worker drops its shard's temporaries and exits
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        results.cancel_join_thread()
