"""Helpers for multi-process tests on the CPU: real gloo process groups, one process per rank.

def worker(rank, world_size, out_dir): ...        # module-level, so spawn can pickle it
spawn_workers(worker, 2, out_dir)                  # raises if any rank fails
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

from dense_model.procutil import kill_process_tree

# torch (and dense_model.parallel, which imports it) are imported where used: tests/conftest.py imports
# this module in every pytest process, and a process that runs no torch (pytest-xdist's controller, an
# inner pytest session of a test) should not pay its ~2.5 s of CPU.


def random_lm_batches(count: int, micro_batch_size: int, seq: int, vocab: int, seed: int = 7) -> list[dict]:
    """``count`` micro-batches of uniformly random tokens in the trainer's batch layout (tokens,
    labels, loss_mask, position_ids: [micro_batch_size, seq] each), the same on every rank for a seed."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, vocab, (micro_batch_size, seq + 1), generator=gen)
        batches.append(
            {
                "tokens": tokens[:, :-1],
                "labels": tokens[:, 1:],
                "loss_mask": torch.ones(micro_batch_size, seq),
                "position_ids": torch.arange(seq).expand(micro_batch_size, seq),
            }
        )
    return batches


def python_docs_text() -> list[str]:
    """English prose shipped with CPython (the pydoc topics), split into paragraphs: test corpora
    without downloading anything."""
    import pydoc_data.topics

    paragraphs: list[str] = []
    for body in pydoc_data.topics.topics.values():
        paragraphs.extend(p.strip() for p in body.split("\n\n") if len(p.strip()) > 40)
    return paragraphs


# SentencePiece trainer settings of the Llama tokenizer: BPE, byte fallback, split digits, no
# normalisation, whitespace-only pieces ("▁▁▁▁" for indentation), extra whitespace kept.
LLAMA_STYLE_SENTENCEPIECE = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="identity",
    allow_whitespace_only_pieces=True,
    remove_extra_whitespaces=False,
    add_dummy_prefix=True,
)


def train_sentencepiece(folder, name: str, code: bool = True, **settings) -> str:
    """Train a SentencePiece model (vocab 512, ids unk 0, bos 1, eos 2) on Python's docs (plus, with
    ``code``, indented code-like lines and mixed scripts), in about a second; ``settings`` go to the
    trainer. Returns the path."""
    import random

    import sentencepiece

    folder = Path(folder)
    lines = python_docs_text()
    if code:
        rng = random.Random(0)
        indented = [" " * rng.choice([0, 2, 4, 8, 12]) + rng.choice(lines)[:80] for _ in range(2000)]
        lines = lines + indented + ["日本語のテキスト 中文 한국어 émigré 0123456789"]
    corpus = folder / f"{name}.txt"
    corpus.write_text("\n".join(lines), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / name),
        vocab_size=512,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        **settings,
    )
    return str(folder / f"{name}.model")


def tiny_model_overrides(
    *, activation: str = "polynorm", layers: int = 2, swiglu_ffn: int = 96, vocab: int = 512, seq: int = 64
) -> list[str]:
    """Config overrides for a model small enough for a 2-core CPU (hidden 64, 4 heads)."""
    return [
        f"model.num_layers={layers}",
        "model.hidden_size=64",
        "model.num_attention_heads=4",
        f"model.swiglu_ffn_hidden_size={swiglu_ffn}",
        f"model.vocab_size={vocab}",
        f"model.seq_length={seq}",
        f"model.activation={activation}",
    ]


def offline_env(folder) -> dict[str, str]:
    """Environment for a subprocess test run: offline Hugging Face hub/datasets with their caches
    under ``folder``, one OpenMP thread, this interpreter (PYTHON) and this checkout importable."""
    folder = Path(folder)
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(folder / "datasets_cache"),
        "HF_MODULES_CACHE": str(folder / "hf_modules"),
        "OMP_NUM_THREADS": "1",
        "PYTHON": sys.executable,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }


def run_tool(
    script, args, folder, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS...`` under offline_env(folder) (or ``env``), its output captured as text: run in a
    worker forked from the fork server (spawn_workers), which already imported torch and
    megatron-core, as ``python SCRIPT`` runs it (``__main__``, ``sys.argv``, the script's folder first
    on ``sys.path``; an uncaught exception prints its traceback and exits 1)."""
    import tempfile

    cmd = [sys.executable, str(script), *map(str, args)]
    env = offline_env(folder) if env is None else env
    _ensure_fork_server()
    ctx = multiprocessing.get_context("forkserver")
    with tempfile.TemporaryDirectory() as out:
        proc = ctx.Process(target=_tool_entry, args=(str(script), cmd[2:], env, out))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            import psutil

            with contextlib.suppress(psutil.NoSuchProcess):  # it may end on its own meanwhile
                kill_process_tree(proc.pid)  # the tool's own children too: they would outlive the session
            proc.join()
            raise subprocess.TimeoutExpired(cmd, timeout)
        stdout, stderr = (Path(out, name).read_text(errors="replace") for name in ("stdout", "stderr"))
    return subprocess.CompletedProcess(cmd, proc.exitcode, stdout, stderr)


def _tool_entry(script: str, args: list[str], env: dict[str, str], out: str) -> None:
    import runpy
    import traceback

    _adopt(env)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    sys.argv = [script, *args]
    # The tool's output at the file-descriptor level (its subprocesses' and C libraries' too).
    for fd, name in ((1, "stdout"), (2, "stderr")):
        with open(os.path.join(out, name), "wb") as f:
            os.dup2(f.fileno(), fd)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        if isinstance(exit_.code, int) or exit_.code is None:
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    end_descendants()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def end_descendants(timeout: float = 10.0) -> None:
    """End what this process started, as its exit would: multiprocessing's exit handler first (it shuts
    down Managers, e.g. the one dist_checkpointing's async writer spawns, and joins children), then
    SIGTERM, and after ``timeout`` SIGKILL, for any descendant still alive. A forked worker ends with
    ``os._exit``, which skips that handler: without this, a Manager outlives the test session."""
    import multiprocessing.util

    import psutil

    multiprocessing.util._exit_function()
    left = psutil.Process().children(recursive=True)
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(left, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What a worker process starts with already imported: forked from a server that imported these once
# (per test process), a worker skips the ~5 s of CPU that importing torch and megatron-core costs a
# freshly spawned one. Only libraries whose import reads no setting a test changes: not transformers
# (HF_MODULES_CACHE), not dense_model's Triton kernels.
PRELOAD = (
    "numpy",
    "torch",
    "torch.distributed",
    "megatron.core",
    "megatron.core.models.gpt",
    "megatron.core.optimizer",
    "megatron.core.distributed",
    "megatron.core.dist_checkpointing",
    "megatron.core.pipeline_parallel",
    "pytest",
)
# Settings read when those libraries are imported: OpenMP takes its thread count when torch loads
# (the server loads it with one thread; each worker applies its job's OMP_NUM_THREADS), and
# megatron-core imports Triton, whose language functions are interpreted only if TRITON_INTERPRET
# was set then. Without CUDA, Triton kernels only ever run interpreted, so the server imports Triton
# with TRITON_INTERPRET=1 and serves every job (a worker whose job leaves it unset runs no Triton
# kernel: the model takes the torch reference). With CUDA it imports Triton to compile, and a job
# asking for the interpreter starts in a fresh process (spawn) instead.


def _interpreting_server() -> bool:
    import torch

    return not torch.cuda.is_available()


def _ensure_fork_server() -> None:
    """Start this process's fork server (once): one OpenMP thread, TRITON_INTERPRET as above."""
    from multiprocessing import forkserver

    saved = dict(os.environ)
    try:
        os.environ.pop("TRITON_INTERPRET", None)
        if _interpreting_server():
            os.environ["TRITON_INTERPRET"] = "1"
        os.environ["OMP_NUM_THREADS"] = "1"
        forkserver.set_forkserver_preload(list(PRELOAD))
        forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def stop_fork_server(timeout: float = 30.0) -> None:
    """Stop this process's fork server, if it runs: closing its "alive" pipe tells it to exit. Waits at
    most ``timeout`` (multiprocessing's own stop waits forever, and a process forked from this one
    without exec holds that pipe too), then kills it."""
    from multiprocessing import forkserver

    import psutil

    server = forkserver._forkserver
    with server._lock:
        if server._forkserver_pid is None:
            return
        pid, address = server._forkserver_pid, server._forkserver_address
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = server._forkserver_pid = server._forkserver_address = None
    try:
        proc = psutil.Process(pid)
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    except psutil.NoSuchProcess:
        pass
    with contextlib.suppress(OSError):
        os.unlink(address)


def leftover_processes(since: float, names: list[str], orphans: bool = True) -> list:
    """Processes the tests of this process started that are still alive (psutil.Process list): its
    descendants but its own multiprocessing resource tracker (it ends when this process does), and,
    with ``orphans``, processes that started at or after ``since`` (epoch seconds), whose command line
    contains one of ``names`` and whose parent is pid 1 or one of this process's ancestors (a
    subreaper): where a process goes when the one that started it exits first, so parentage alone
    misses it. Zombies do not count."""
    from multiprocessing import resource_tracker

    import psutil

    me = psutil.Process()
    ancestors = {p.pid for p in me.parents()}
    tracker = resource_tracker._resource_tracker._pid
    found = {p.pid: p for p in me.children(recursive=True) if p.pid != tracker}
    if orphans:
        for proc in psutil.process_iter(["ppid", "create_time", "cmdline"]):
            info = proc.info
            if proc.pid == me.pid or proc.pid in ancestors or info["create_time"] is None:
                continue
            if (info["ppid"] == 1 or info["ppid"] in ancestors) and info["create_time"] >= since:
                if any(name in " ".join(info["cmdline"] or ()) for name in names):
                    found[proc.pid] = proc
    alive = []
    for proc in found.values():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def start_method(env: dict[str, str]) -> str:
    """``forkserver`` where the server's imports serve the job's environment, else ``spawn``."""
    return "forkserver" if _interpreting_server() or "TRITON_INTERPRET" not in env else "spawn"


def _adopt(env: dict[str, str]) -> None:
    """A worker takes its job's environment: the caller's at the call (the fork server's is from when
    it started), set before the job is unpickled or run (importing its modules may read it)."""
    os.environ.clear()
    os.environ.update(env)
    import torch

    # OpenMP read OMP_NUM_THREADS when the server loaded torch: apply this job's value.
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    # The caller's sys.path comes down with the job; where an earlier test in the caller loaded
    # remote code from another HF_MODULES_CACHE, that cache's ``transformers_modules`` would shadow
    # this job's: drop every such cache.
    # transformers puts its own cache back on sys.path when it loads remote code (init_hf_modules).
    sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p, "transformers_modules"))]


def _entry(rank, world_size, port, env, payload):
    _adopt(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from dense_model.parallel import destroy_parallel

    fn, args = pickle.loads(payload)
    try:
        fn(rank, world_size, *args)
        destroy_parallel()
    finally:
        end_descendants()


def spawn_workers(fn, world_size: int, *args, env: dict[str, str] | None = None) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes wired for torch.distributed,
    each with this process's environment (plus ``env``; one OpenMP thread unless ``env`` says)."""
    import torch.multiprocessing as mp

    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    method = start_method(env)
    if method == "forkserver":
        _ensure_fork_server()
    payload = pickle.dumps((fn, args))
    mp.start_processes(
        _entry,
        args=(world_size, free_port(), env, payload),
        nprocs=world_size,
        join=True,
        start_method=method,
    )


def run_layouts(fn, layouts: dict, out_dir) -> dict:
    """``layouts``: world size -> {name: ...}; runs ``fn(rank, world_size, layouts[world_size],
    out_dir)`` once per world size, where each rank saves ``OUT_DIR/NAME.rankR`` with torch.save.
    Returns name -> the ranks' saved objects."""
    import torch

    results = {}
    for world_size, named in layouts.items():
        spawn_workers(fn, world_size, named, str(out_dir))
        for name in named:
            results[name] = [torch.load(Path(out_dir) / f"{name}.rank{r}") for r in range(world_size)]
    return results
