"""The run (`preprocess`): plan, check the work folder, tokenise this task's shards, merge."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable

import numpy as np

import dense_model.data.preprocess.shard as shard
from dense_model.data.indexed import token_dtype
from dense_model.data.jsonl import BadLineError, BadLineStats, absolute_line
from dense_model.data.preprocess.claims import release, remove_stale_temporaries, write_json
from dense_model.data.preprocess.config import (
    MANIFEST_VERSION,
    MB,
    PreprocessConfig,
    PreprocessSummary,
    check_config,
)
from dense_model.data.preprocess.merge import Merger, merge_outputs, outputs_of, write_blends
from dense_model.data.preprocess.plan import (
    ShardSpec,
    default_shard_size,
    dispatch_order,
    input_files,
    plan_shards,
    shard_plan_hash,
)
from dense_model.data.preprocess.pool import run_pool, sigterm_as_interrupt
from dense_model.data.preprocess.progress import Progress
from dense_model.data.preprocess.shard import ShardContext
from dense_model.data.preprocess.workdir import (
    claim_merge,
    claim_task,
    finished_shards,
    is_run_file,
    locked,
    merge_claim_path,
    output_names,
    prepare_work_dir,
    published_outputs,
    reset_work_dir,
    run_settings,
    task_claim_path,
)
from dense_model.data.tokenizers import build_tokenizer


def make_output_folder(folder: str, output_prefix: str) -> None:
    """``os.makedirs(folder)``, or a ValueError naming --output-prefix and what is in the way (a
    file where a folder is needed, no permission, a read-only or full file system)."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        blocker = folder
        while blocker and not os.path.exists(blocker):
            blocker = os.path.dirname(blocker)
        why = (
            f"{blocker} is a file, not a folder"
            if os.path.exists(blocker) and not os.path.isdir(blocker)
            else (err.strerror or str(err))
        )
        raise ValueError(
            f"--output-prefix {output_prefix}: cannot create the folder {folder} ({why}); "
            "choose an --output-prefix in a folder you can write"
        ) from None


def preprocess(cfg: PreprocessConfig, log: Callable[[str], None] | None = print) -> PreprocessSummary:
    """Run (or resume) preprocessing, or this task's share of it; see the module docstring."""
    t0 = time.monotonic()
    say = log or (lambda _msg: None)
    check_config(cfg)
    tokenizer = build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model)
    dtype = token_dtype(tokenizer.vocab_size).__name__
    files = input_files(cfg)
    work_dir = os.path.abspath(cfg.output_prefix) + ".shards"
    for folder in (os.path.dirname(work_dir), work_dir):
        make_output_folder(folder, cfg.output_prefix)
    settings = run_settings(cfg, tokenizer, dtype)
    several_tasks = cfg.num_tasks > 1 or cfg.merge_only
    task = f"task {cfg.task_index}/{cfg.num_tasks}: " if cfg.num_tasks > 1 else ""

    with sigterm_as_interrupt(), contextlib.ExitStack() as lock, contextlib.ExitStack() as merging:
        lock.enter_context(locked(work_dir, wait=several_tasks, say=say))
        # Claim, then check, then delete: a second instance of a running task index (or a --restart
        # while any task works) is refused before anything of the running one is touched.
        if not cfg.merge_only:  # one process per task index (a resubmission would delete our files)
            merging.callback(release, claim_task(work_dir, cfg))
        output_files = output_names(work_dir, cfg)  # read before a --restart forgets the subsets merged
        manifest = prepare_work_dir(work_dir, settings, cfg.restart, say, merge_only=cfg.merge_only)
        if manifest is None:
            reset_work_dir(work_dir)
        remove_stale_temporaries(work_dir, cfg.output_prefix, say, outputs=output_files)
        total_bytes = sum(os.path.getsize(p) for p, _ in files)
        if cfg.shard_size_mb is not None:
            shard_size = max(int(cfg.shard_size_mb * MB), 1)
        elif manifest is not None:
            shard_size = int(manifest["shard_size"])
        else:
            shard_size = default_shard_size(total_bytes)
        shards = plan_shards(files, shard_size)
        write_json(
            os.path.join(work_dir, "manifest.json"),
            {"version": MANIFEST_VERSION, "settings": settings, "shard_size": shard_size},
        )

        plan_hash = shard_plan_hash(shards)
        published = published_outputs(work_dir, plan_hash)
        results = finished_shards(work_dir, shards, published)
        # With several tasks, task i takes every N-th shard of this order (the same in every task).
        order = dispatch_order(shards, by_subset=cfg.subset_from == "layout")
        if several_tasks:
            share = {s.id for n, s in enumerate(order) if n % cfg.num_tasks == cfg.task_index}
            share = set() if cfg.merge_only else share
        else:
            share = {s.id for s in shards}
        pending = [s for s in order if s.id not in results and s.id in share]
        # Drop what no finished shard owns (old plans, partial files), other tasks' shards excepted.
        for name in os.listdir(work_dir):
            sid = name.split(".", 1)[0]
            if not is_run_file(name) and sid not in results and (sid in share or not several_tasks):
                os.remove(os.path.join(work_dir, name))
        if several_tasks:
            lock.close()  # tasks work side by side; each touches only its own shards
        reused = len(results)
        pending_bytes = sum(s.input_bytes for s in pending)
        workers = max(1, min(cfg.workers, len(pending)))
        say(
            f"preprocess: {task}{len(files)} files, {total_bytes / MB:,.1f} MB, {len(shards)} shards of up to "
            f"{shard_size / MB:.3g} MB"
            + (f"; resuming: {reused} shards already done, {len(pending)} to go" if reused else "")
            + (f"; {len(pending)} shards for this task" if several_tasks else "")
            + (f"; {workers} workers" if pending else "")
        )

        progress = Progress(pending_bytes, cfg.progress, cfg.log_interval, log, len(pending))
        merger = Merger(cfg, work_dir, plan_hash, np.dtype(dtype).itemsize, say)
        # On an error or an interrupt (Ctrl-C, SIGTERM), running merges stop and remove their temporaries.
        merging.push(lambda exc_type, _exc, _tb: merger.close(cancel=exc_type is not None))
        # --subset-from layout on one machine: a subset's shards are known before any is read, so its
        # outputs are merged (and its shards deleted) as soon as they are done, while others tokenise.
        unmerged: dict[str, list[ShardSpec]] = {}
        if cfg.subset_from == "layout" and not several_tasks:
            for spec in shards:
                unmerged.setdefault(spec.path_subset, []).append(spec)

        def merge_ready() -> None:
            for subset in [k for k, specs in unmerged.items() if all(s.id in results for s in specs)]:
                merger.submit(outputs_of(unmerged.pop(subset), results, work_dir)[0], published)
            merger.check()

        def on_done(result: dict) -> None:
            results[result["id"]] = result
            progress.shards_done += 1
            merge_ready()

        ctx_args = {
            "work_dir": work_dir,
            "json_keys": tuple(cfg.json_keys),
            "append_eod": bool(cfg.append_eod),
            "split_by_subset": bool(cfg.split_by_subset),
            "strict": bool(cfg.strict),
            "dtype": dtype,
            "subset_from": cfg.subset_from,
            "batch_chars": int(cfg.batch_chars),
            "batch_delay": float(cfg.batch_delay),
        }
        try:
            if workers == 1:
                ctx = ShardContext(tokenizer=tokenizer, **ctx_args)
                progress.begin()
                merge_ready()
                for spec in pending:
                    on_done(shard.process_shard(spec, ctx, progress.update))
            elif pending:
                ctx_args.update(tokenizer_type=cfg.tokenizer_type, tokenizer_model=cfg.tokenizer_model)
                run_pool(pending, workers, ctx_args, progress, merge_ready, on_done)
        except BadLineError as err:
            if err.line is None:
                err.line = absolute_line(err.path, err.offset)
            raise
        except KeyboardInterrupt as err:
            progress.close()
            say(
                f"\ninterrupted{f' ({err})' if str(err) else ''}: {len(results)} of {len(shards)} shards are finished and kept in {work_dir}; "
                "rerun the same command to resume."
            )
            raise
        finally:
            progress.close()

        def summary(outputs, bad, lines, blends, merged=True) -> PreprocessSummary:
            result = PreprocessSummary(
                outputs=outputs,
                bad=bad,
                files=len(files),
                total_bytes=total_bytes,
                input_bytes=pending_bytes,
                shards=len(shards),
                shards_reused=reused,
                lines=lines,
                seconds=time.monotonic() - t0,
                tokens_this_run=sum(o["tokens"] for s in pending for o in results[s.id]["outputs"]),
                blends=blends,
                merged=merged,
            )
            say(result.format())
            return result

        if several_tasks:
            # Other tasks' shards finished meanwhile count too.
            results.update(finished_shards(work_dir, [s for s in shards if s.id not in results], published))
            missing = sum(s.id not in results for s in shards)
            if missing and cfg.merge_only:
                raise RuntimeError(
                    f"--merge-only: {missing} of {len(shards)} shards in {work_dir} are not finished; rerun "
                    "the tasks that own them (the same command with their --task-index) first."
                )
            if missing and not other_tasks_seen(work_dir, cfg, shards, results, share):
                raise RuntimeError(
                    f"{task}this task's shards are done but {missing} of {len(shards)} are other tasks' and no "
                    f"other task of this run has registered in {work_dir}: nothing is merged, no "
                    f"{cfg.output_prefix}_*.bin written. Run the other --task-index values (or drop "
                    "--task-index/--num-tasks/--slurm-array to do it all in one task)"
                )
            if missing:
                say(
                    f"{task}this task's shards are done; {missing} shards of other tasks are not: the last task merges"
                )
                return summary([], BadLineStats(), 0, [], merged=False)
            with locked(work_dir, wait=True, say=say):
                claimed = claim_merge(work_dir, cfg)
            if claimed:
                lock.callback(release, merge_claim_path(work_dir))  # after the merges stopped
            else:
                say(f"{task}every shard is done; another task claimed the merge")
                return summary([], BadLineStats(), 0, [], merged=False)
        outputs, bad, lines = merge_outputs(cfg, shards, results, published, work_dir, dtype, say, merger)
        blends = write_blends(cfg, outputs)

    if not cfg.keep_shards:
        shutil.rmtree(work_dir, ignore_errors=True)
    return summary(outputs, bad, lines, blends)


def other_tasks_seen(work_dir: str, cfg: PreprocessConfig, shards, results: dict, share: set) -> bool:
    """Whether another task of this run ever registered: a claim other than this task's (a task's,
    the merge's), or a finished shard outside this task's share."""
    own = os.path.basename(task_claim_path(work_dir, cfg))
    if any(s.id in results and s.id not in share for s in shards):
        return True
    return any(n.endswith(".claim") and n != own for n in os.listdir(work_dir))
