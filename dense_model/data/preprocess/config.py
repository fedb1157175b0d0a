"""The settings of a preprocessing run, its errors and its summary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from dense_model.data.blend import WEIGHTINGS
from dense_model.data.jsonl import BadLineStats

MANIFEST_VERSION = 1
MB = 1_000_000
SUBSET_SOURCES = ("record", "layout")  # values of --subset-from


class ResumeError(RuntimeError):
    """The work folder belongs to a run with other settings."""


class NoDocumentsError(RuntimeError):
    """Every line was skipped: nothing to write."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a time limit, `scancel`, `kill`), handled as Ctrl-C is: workers stopped, merges
    cancelled, their temporaries removed, nothing published half-written."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


@dataclass
class PreprocessConfig:
    """One preprocessing run (the CLI flags, see preprocess_data.py --help)."""

    inputs: Sequence[str]
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: str
    json_keys: Sequence[str] = ("text",)
    append_eod: bool = False
    workers: int = 1
    split_by_subset: bool = False
    # Where --split-by-subset finds a record's subset: "record" (its red_pajama_subset/meta fields,
    # else the file layout) or "layout" (the file layout alone: every shard's subset is known before
    # it is read, so each subset is merged as soon as its own shards are done).
    subset_from: str = "record"
    blend_weighting: str = "tokens"
    strict: bool = False
    shard_size_mb: float | None = None
    progress: bool | None = None  # None: a bar when stderr is a terminal
    restart: bool = False
    keep_shards: bool = False
    log_interval: float = 60.0
    batch_chars: int = 1 << 20  # characters of text per encode_batch call
    hf_dataset: str | None = None  # a Hugging Face dataset name, read from the local cache
    hf_split: str = "train"
    task_index: int = 0  # this task's share of the shard plan, of num_tasks (several machines)
    num_tasks: int = 1
    merge_only: bool = False  # tokenise nothing: merge once every task's shards are done
    # Debug option: seconds to sleep after each encoded batch and each merged output (slows a run
    # down to watch or kill it).
    batch_delay: float = 0.0


@dataclass
class OutputInfo:
    prefix: str
    subset: str | None
    key: str
    documents: int
    tokens: int
    dtype: str


@dataclass
class PreprocessSummary:
    outputs: list[OutputInfo]
    bad: BadLineStats
    files: int
    total_bytes: int  # all input files
    input_bytes: int  # read by this run (reused shards excluded)
    shards: int
    shards_reused: int
    lines: int
    seconds: float
    tokens_this_run: int = 0  # tokens of the shards this run tokenised (reused ones excluded)
    blends: list[str] = field(default_factory=list)
    merged: bool = True  # False: a task of a multi-task run that left the merge to another task

    @property
    def documents(self) -> int:
        return sum(o.documents for o in self.outputs)

    @property
    def tokens(self) -> int:
        return sum(o.tokens for o in self.outputs)

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self.bad.counts)

    def format(self) -> str:
        secs = max(self.seconds, 1e-9)
        lines = [
            f"preprocess: done in {self.seconds:.1f} s",
            f"  input: {self.files} files, {self.total_bytes / MB:,.1f} MB, {self.shards} shards"
            + (f" ({self.shards_reused} reused from an earlier run)" if self.shards_reused else ""),
            f"  documents: {self.documents:,}  tokens: {self.tokens:,}  "
            f"(this run: {self.tokens_this_run / secs:,.0f} tokens/s, {self.input_bytes / MB / secs:,.2f} MB/s)",
        ]
        bad = self.bad
        reasons = ", ".join(f"{r} {n:,}" for r, n in bad.counts.items() if n)
        lines.append(f"  skipped lines: {bad.total:,}" + (f" ({reasons})" if reasons else ""))
        if bad.blank_lines:
            lines.append(f"  blank lines ignored: {bad.blank_lines:,}")
        if bad.positions:
            lines.append("  first bad lines: " + "; ".join(bad.resolved_positions()))
        lines.append("  outputs:" if self.merged else "  outputs: merged by another task")
        for o in self.outputs:
            lines.append(
                f"    {o.prefix}.bin/.idx  {o.documents:,} documents, {o.tokens:,} tokens, {o.dtype}"
            )
        for blend in self.blends:
            lines.append(f"  blend: {blend}")
        return "\n".join(lines)


def check_config(cfg: PreprocessConfig) -> None:
    if cfg.blend_weighting not in WEIGHTINGS:
        raise ValueError(f"--blend-weighting {cfg.blend_weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
    if not cfg.json_keys:
        raise ValueError("--json-keys needs at least one key")
    if cfg.workers < 1:
        raise ValueError(f"--workers {cfg.workers}: must be at least 1")
    if cfg.num_tasks < 1 or not 0 <= cfg.task_index < cfg.num_tasks:
        raise ValueError(
            f"--task-index {cfg.task_index} --num-tasks {cfg.num_tasks}: need 0 <= task index < number of tasks"
        )
    if cfg.subset_from not in SUBSET_SOURCES:
        raise ValueError(f"--subset-from {cfg.subset_from!r}: choose one of {', '.join(SUBSET_SOURCES)}")
    if cfg.subset_from == "layout" and not cfg.split_by_subset:
        raise ValueError("--subset-from layout names where subsets come from: add --split-by-subset")
    if cfg.restart and (cfg.num_tasks > 1 or cfg.merge_only):
        raise ValueError("--restart discards every task's shards: run it without --num-tasks/--merge-only")
