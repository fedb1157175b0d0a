"""Preprocessing cleans up after itself: SIGTERM mid-merge, SIGKILL then a rerun, a second instance of a
task, a crash around an output's published record, settings the shards were not made with. Through
the user's command (preprocess_data.py) where a signal is involved."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import dense_model.data.preprocess.merge as merge_stage
from dense_model.data.preprocess import ResumeError, preprocess
from tests.data.helpers import preprocess_config, run_cli, wait_for


def _temporaries(prefix: Path) -> list[str]:
    """Every `*.tmp.PID` next to the outputs and in the work folder."""
    work = Path(str(prefix) + ".shards")
    places = [prefix.parent, *([work] if work.is_dir() else [])]
    return sorted(str(p) for place in places for p in place.iterdir() if ".tmp." in p.name)


def _merging(prefix: Path):
    """True once an output's temporary .bin exists: a merge is under way."""
    return lambda: any(prefix.parent.glob(prefix.name + "_*_document.bin.tmp.*"))


def _args(root: str, spm_model: str, prefix: Path, *extra: str) -> list[str]:
    return [
        "--input", root, "--output-prefix", str(prefix), "--tokenizer-type", "sentencepiece",
        "--tokenizer-model", spm_model, "--append-eod", "--split-by-subset", "--workers", "1", "--no-progress",
        *extra,
    ]  # fmt: skip


@pytest.fixture
def three_subsets(tmp_path, spm_model, corpora):
    """(input folder with three subsets, their outputs made by an uninterrupted run)."""
    root = str(Path(corpora[None]).parent)  # plain/, zst/, gz/
    ref = preprocess(
        preprocess_config(spm_model, tmp_path / "ref" / "red", [root], split_by_subset=True), log=None
    )
    return root, ref


def _assert_same_outputs(prefix: Path, ref, data_helpers) -> None:
    for o in ref.outputs:
        merged = o.prefix.replace(str(Path(o.prefix).parent / "red"), str(prefix))
        assert data_helpers.file_bytes(merged) == data_helpers.file_bytes(o.prefix), merged


def _stop_mid_merge(root, spm_model, prefix, stop):
    """Run the CLI, ``stop(proc)`` once a merge's temporary exists; (proc, its output)."""
    # The debug delay pauses each merge after its first shard, while its temporary exists.
    proc = run_cli(_args(root, spm_model, prefix, "--debug-batch-delay", "0.3"))
    wait_for(proc, _merging(prefix), "a merge's temporary")
    stop(proc)
    return proc, proc.communicate(timeout=120)[0]


@pytest.mark.slow
def test_sigterm_mid_merge_leaves_no_temporary_and_a_rerun_finishes(
    tmp_path, spm_model, three_subsets, data_helpers
):
    root, ref = three_subsets
    prefix = tmp_path / "run" / "red"
    proc, out = _stop_mid_merge(root, spm_model, prefix, lambda proc: proc.send_signal(signal.SIGTERM))
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "Traceback" not in out, out
    assert _temporaries(prefix) == [], "an interrupted merge left its temporaries"
    assert not list(prefix.parent.glob("*.claim")) and not list(Path(str(prefix) + ".shards").glob("*.claim"))
    for idx in prefix.parent.glob("*_document.idx"):  # published before the signal: complete
        assert data_helpers.file_bytes(str(idx)[:-4]) == data_helpers.file_bytes(
            str(idx)[:-4].replace(str(prefix), str(tmp_path / "ref" / "red"))
        )

    rerun = run_cli(_args(root, spm_model, prefix))
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    assert f"resuming: {ref.shards} shards already done, 0 to go" in out
    _assert_same_outputs(prefix, ref, data_helpers)
    assert _temporaries(prefix) == [] and not Path(str(prefix) + ".shards").exists()


@pytest.mark.slow
def test_sigkill_mid_merge_leaves_temporaries_that_the_rerun_removes(
    tmp_path, spm_model, three_subsets, data_helpers
):
    root, ref = three_subsets
    prefix = tmp_path / "run" / "red"
    proc, _ = _stop_mid_merge(root, spm_model, prefix, lambda proc: proc.kill())
    left = [t for t in _temporaries(prefix) if Path(t).parent == prefix.parent]
    assert left, "SIGKILL cannot clean up: the merge's temporary stays"
    assert (Path(str(prefix) + ".shards") / "task.0.claim").exists(), "the dead run's claim stays"

    rerun = run_cli(_args(root, spm_model, prefix))
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    for t in left:
        assert f"removed {t}, left by an interrupted run (pid {proc.pid})" in out, out
    assert _temporaries(prefix) == []
    _assert_same_outputs(prefix, ref, data_helpers)


def test_a_second_instance_of_a_task_index_is_refused(tmp_path, spm_model, corpora):
    prefix = tmp_path / "out"
    claim = Path(str(prefix) + ".shards") / "task.0.claim"
    args = _args(
        corpora[None], spm_model, prefix, "--task-index", "0", "--num-tasks", "2", "--shard-size-mb", "0.01"
    )
    first = run_cli([*args, "--debug-batch-delay", "5"])  # 6 shards for this task: 30 s, cut short below
    work = claim.parent
    wait_for(first, lambda: claim.exists() or any(work.glob("*.done.json")), "the first instance at work")
    second = run_cli(args)
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Task 0 of 2 is claimed by task 0 of 2, pid "), out
    assert f"pid {first.pid} on " in out and f"delete {claim} and rerun" in out
    assert first.poll() is None, "the second instance stopped the first"

    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, out
    assert not claim.exists(), "the claim is released on the way out"
    assert _temporaries(prefix) == []


class _Crash(Exception):
    """Stands for a kill at one point of the merge."""


@pytest.mark.parametrize("crash", ["before the record", "after the record"])
def test_a_crash_around_an_outputs_published_record_retokenises_nothing(
    tmp_path, spm_model, three_subsets, data_helpers, monkeypatch, crash
):
    """An output's shards are deleted only once its published.*.json record is written (and fsynced):
    a crash in between leaves either the shards or the record, and a rerun re-tokenises nothing."""
    root, ref = three_subsets
    prefix = tmp_path / "run" / "red"
    cfg = preprocess_config(spm_model, prefix, [root], split_by_subset=True)
    write_json = merge_stage.write_json

    def crashing(path, obj, durable=True):
        if os.path.basename(path).startswith("published."):
            if crash == "after the record":
                write_json(path, obj, durable)
            raise _Crash(path)
        write_json(path, obj, durable)

    monkeypatch.setattr(merge_stage, "write_json", crashing)
    with pytest.raises(_Crash):
        preprocess(cfg, log=None)
    monkeypatch.undo()
    records = list(Path(str(prefix) + ".shards").glob("published.*.json"))
    assert bool(records) == (crash == "after the record")

    again = preprocess(cfg, log=None)
    assert (again.shards_reused, again.tokens_this_run) == (ref.shards, 0), "shards were re-tokenised"
    _assert_same_outputs(prefix, ref, data_helpers)


def test_the_manifest_records_strict_and_the_task_count(tmp_path, spm_model, corpora):
    prefix = tmp_path / "out"

    def cfg(**kw):
        return preprocess_config(spm_model, prefix, [corpora["gz"]], keep_shards=True, **kw)

    preprocess(cfg(), log=None)
    with pytest.raises(
        ResumeError, match=r"\(strict: False there, True now\)\. Rerun with the same settings"
    ):
        preprocess(cfg(strict=True), log=None)  # shards made without --strict hold what it refuses
    with pytest.raises(ResumeError, match=r"\(num_tasks: 1 there, 2 now\)"):
        preprocess(cfg(task_index=1, num_tasks=2), log=None)  # other shares of the same shards
    assert preprocess(cfg(strict=True, restart=True), log=None).shards_reused == 0
    assert preprocess(cfg(strict=True), log=None).shards_reused == 3


def test_stale_temporaries_are_only_those_of_dead_processes_of_this_prefix(tmp_path):
    import json
    import subprocess

    from dense_model.data.preprocess.claims import owner, remove_stale_temporaries

    proc = subprocess.Popen(["true"])
    proc.wait()
    dead, alive = proc.pid, os.getpid()
    work = tmp_path / "red.shards"
    work.mkdir()
    (work / "task.1.claim").write_text(json.dumps(owner("task 1 of 2")))  # a live task (this process)
    names = {
        work / f"published.ab.json.tmp.{dead}": False,  # a dead merger's record
        work / f"manifest.json.tmp.{dead}": False,
        work / f"manifest.json.tmp.{alive}": True,  # the live claimant's
        work / f"0123.0.bin.tmp.{dead}": True,  # a shard's: a live task's worker may write it
        tmp_path / f"red_arxiv_text_document.bin.tmp.{dead}": False,  # an interrupted merge
        tmp_path / f"red_arxiv_text_document.idx.tmp.{dead}": False,
        tmp_path / f"red_text_document.bin.tmp.{alive}": True,  # a merge under way
        tmp_path / f"blue_text_document.bin.tmp.{dead}": True,  # another prefix's
        tmp_path / "red_text_document.bin": True,
    }
    for path in names:
        path.write_bytes(b"x")
    said: list[str] = []
    assert remove_stale_temporaries(str(work), str(tmp_path / "red"), said.append) == 4
    assert {p: p.exists() for p in names} == names
    assert len(said) == 2 and f"(pid {dead})" in said[0]


@pytest.mark.slow
def test_sigterm_to_the_process_group_mid_tokenise_stops_the_workers_cleanly(tmp_path, spm_model, corpora):
    """As a time limit sends it: to every process of the job. The workers drop their shards' files."""
    prefix = tmp_path / "out"
    work = Path(str(prefix) + ".shards")
    args = _args(corpora[None], spm_model, prefix, "--shard-size-mb", "0.01", "--debug-batch-delay", "1")
    proc = run_cli([*args[: args.index("--workers") + 1], "2", *args[args.index("--workers") + 2 :]],
                   start_new_session=True)  # fmt: skip
    wait_for(proc, lambda: any(work.glob("*.bin.tmp.*")), "a shard under way")
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "interrupted (signal 15)" in out and "Traceback" not in out, out
    assert _temporaries(prefix) == [] and not list(work.glob("*.claim"))


@pytest.mark.parametrize("task", ["0", "1"])
def test_restart_while_a_task_runs_is_refused_before_anything_is_deleted(tmp_path, spm_model, corpora, task):
    """--restart (one machine) discards every task's shards: while task 0 (the index a one-machine run
    claims too) or task 1 of 2 works, it is refused (exit 2, naming the running task), the finished
    shards are kept and the task goes on."""
    prefix = tmp_path / "out"
    work = Path(str(prefix) + ".shards")
    args = _args(corpora[None], spm_model, prefix, "--shard-size-mb", "0.01")
    # 6 shards for this task at 5 s each: it still runs when the --restart (a fresh Python) gets there
    first = run_cli([*args, "--num-tasks", "2", "--task-index", task, "--debug-batch-delay", "5"])
    wait_for(first, lambda: any(work.glob("*.done.json")), f"a finished shard of task {task}")
    done = {p.name: p.read_bytes() for p in work.iterdir() if ".tmp." not in p.name}
    second = run_cli([*args, "--restart"])
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 2, out
    (line,) = out.strip().splitlines()
    claimed = "This --output-prefix is claimed by" if task == "0" else "--restart would delete the shards"
    assert line.startswith(f"error: {claimed}") and f"pid {first.pid} on " in line, out
    assert all(work.joinpath(name).read_bytes() == data for name, data in done.items())
    assert first.poll() is None, f"the refused --restart stopped task {task}"
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, out
    assert all(
        work.joinpath(name).read_bytes() == data for name, data in done.items() if ".claim" not in name
    )


def test_dead_temporaries_are_removed_by_exact_name_and_a_foreign_folder_is_kept(
    tmp_path, spm_model, corpora
):
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    ours = tmp_path / f"red_text_document.bin.tmp.{proc.pid}"  # a dead merge of prefix red
    theirs = tmp_path / f"red_v2_text_document.bin.tmp.{proc.pid}"  # prefix red_v2's, or a live host's
    for path in (ours, theirs):
        path.write_bytes(b"x")
    preprocess(preprocess_config(spm_model, tmp_path / "red", [corpora["gz"]]), log=None)
    assert not ours.exists() and theirs.read_bytes() == b"x"
    # a folder named like the work folder that preprocessing did not make: refused, kept
    (tmp_path / "blue.shards").mkdir()
    (tmp_path / "blue.shards" / "notes.txt").write_text("mine")
    with pytest.raises(ResumeError, match=r"blue\.shards holds notes\.txt but no manifest\.json"):
        preprocess(preprocess_config(spm_model, tmp_path / "blue", [corpora["gz"]]), log=None)
    assert (tmp_path / "blue.shards" / "notes.txt").read_text() == "mine"
