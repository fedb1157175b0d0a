"""The check before launch: what ``run_pretrain.sh`` runs before torchrun starts (no process group, no GPU).

    python -m dense_model.launcher [CONFIG] [k=v ...] [--world-size N] [--dry-run] [--check-run-dir]
        [--torchrun TORCHRUN_ARGS...]

The config loaded and validated for the world size (``dense_model.config``), ``evaluation.in_loop``'s
lm-eval tasks built offline (``training.downstream``), ``data.split`` against
each dataset's document count (the .idx headers; the demo's data tokenised first), the run directory not
held by another job (``--check-run-dir``, ``training.run_lock``), and ``--dry-run``'s report: the
resolved config, the world layout, the batch arithmetic and the parameter count (``model``). A bad
value is one line on stderr and exit 2. With ``--torchrun``, a config that passes is launched from the
same process: the arguments after it are torchrun's (``torch.distributed.run``), its command line is
printed and torchrun runs here (one Python with torch per launch, not one for the check and another
for torchrun). Above training: it imports the layers below, none imports it.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from dense_model.checkpoint.layout import CheckpointError, plan_run_load
from dense_model.config import (
    Config,
    ConfigError,
    config_to_dict,
    load_config,
    padded_vocab_size,
    resolve_vocab_size,
    split_config_argument,
    train_and_warmup_steps,
    validate,
    warmup_tokens,
)
from dense_model.data.blend import load_blend
from dense_model.data.demo import demo_work_dir, prepare_demo_dataset, prepared_demo_dataset
from dense_model.data.gpt_dataset import check_split_against_datasets
from dense_model.data.validation_sets import check_validation_tokens, resolve_validation_sets
from dense_model.model import count_parameters
from dense_model.training.pretrain import load_downstream_tasks
from dense_model.training.run_lock import RunDirBusy, check_free


def describe_job(cfg: Config, world_size: int) -> str:
    """The resolved config, the world layout, the batch arithmetic and the parameter count."""
    t, p = cfg.training, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = world_size // (tp * pp)
    iters, warmup = train_and_warmup_steps(cfg)
    tokens_per_step = t.global_batch_size * cfg.model.seq_length
    params = count_parameters(cfg.model)
    layout = (
        f"world {world_size} = TP {tp} x PP {pp} x DP {dp} | micro-batches per step "
        f"{t.global_batch_size // (t.micro_batch_size * dp)} of {t.micro_batch_size} per DP rank | "
        f"{tokens_per_step:,} tokens per step | {iters:,} steps ({warmup:,} warm-up), "
        f"{iters * tokens_per_step:,} tokens | {params['total']:,} parameters "
        f"({params['non_embedding']:,} without embeddings)"
    )
    if params["active"] != params["total"]:  # MoE: what a token passes through (top-k experts)
        layout += f" | {params['active']:,} active per token"
    layout += (
        f" | total {params['total'] / 1e9:.1f}B, active {params['active'] / 1e9:.1f}B | vocabulary "
        f"{cfg.model.vocab_size:,} padded to {padded_vocab_size(cfg.model, tp):,}"
    )
    if t.lr_decay_tokens is not None:
        layout += (
            f" | lr {t.lr_warmup_init * t.lr:.4g} -> {t.lr:.4g} over {warmup_tokens(cfg):,} tokens, "
            f"{t.lr_decay_style} to {t.min_lr:.4g} at {t.lr_decay_tokens:,} tokens"
        )
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False) + layout


def check_data(cfg: Config, build_demo: bool = True) -> None:
    """What the job would otherwise find after writing its run directory: the tokens of
    ``data.validation_sets`` against the tokenizer (their .bin scanned: here, once before launch, not
    at every config load), and ``data.split`` against each dataset's document count (.idx headers).
    The demo's data is tokenised here on first use (the job's first step otherwise, cached either
    way); ``build_demo=False`` (a dry run) checks it only if it is built already. Raises ValueError
    or FileNotFoundError with one line naming the dataset and the fix."""
    d = cfg.data
    if d.validation_sets:
        sets = resolve_validation_sets(d.validation_sets)
        check_validation_tokens(sets, vocab_size=d.tokenizer_vocab_size())
    if d.demo:
        demo = prepare_demo_dataset(demo_work_dir()) if build_demo else prepared_demo_dataset(demo_work_dir())
        if demo is None:
            return
        prefixes = load_blend(demo["blend"])[0]
    elif d.blend:
        prefixes = load_blend(d.blend)[0]
    else:
        prefixes = list(d.paths)
    check_split_against_datasets(prefixes, d.split)


def main(argv: list[str] | None = None) -> int:
    """``python -m dense_model.launcher [CONFIG] [k=v ...] [--world-size N] [--dry-run] [--check-run-dir]
    [--torchrun ARGS...]``: exit 2 with a one-line message if the config cannot run; else 0, or with
    ``--torchrun`` what torchrun exits with."""
    argv = list(sys.argv[1:] if argv is None else argv)
    torchrun_args = None
    if "--torchrun" in argv:
        cut = argv.index("--torchrun")
        argv, torchrun_args = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description="Check a training config before launching it.")
    parser.add_argument("config", nargs="?", help="YAML config (default: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--world-size", type=int, default=None, help="processes the job will run")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved job and exit")
    parser.add_argument(
        "--check-run-dir", action="store_true", help="also fail if another job holds the run directory"
    )
    args = parser.parse_intermixed_args(argv)
    config, overrides = split_config_argument(args.config, args.overrides)
    try:
        cfg = load_config(config, overrides)
        if args.dry_run:  # the values first: the report needs no data or tokenizer file
            validate(cfg, world_size=args.world_size, files=False)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        validate(cfg, world_size=args.world_size)
        plan_run_load(cfg)
        check_data(cfg, build_demo=not args.dry_run)
        load_downstream_tasks(cfg)  # evaluation.in_loop: a task unknown or not readable offline
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as err:
        if not args.dry_run:
            print(f"config error: {err}", file=sys.stderr)
            return 2
        unready = err
    else:
        unready = None
    if args.check_run_dir:
        try:
            check_free(cfg.run_dir)
        except RunDirBusy as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.dry_run:
        return dry_run(cfg, args.world_size or 1, unready)
    if torchrun_args is not None:
        return torchrun(torchrun_args)
    return 0


def dry_run(cfg: Config, world_size: int, unready: Exception | None) -> int:
    """Print the job (``describe_job``), then what keeps it from launching here (a data, tokenizer or
    checkpoint file) as one line on stderr and exit 2: the report is printed either way, and the
    exit status stays a go/no-go answer. The vocabulary is model.vocab_size, else the tokenizer's
    (exit 2 if neither is there)."""
    if cfg.model.vocab_size is None or not unready:
        try:
            cfg.model.vocab_size = resolve_vocab_size(cfg)  # the tokenizer's, as the trainer resolves it
        except ConfigError as err:
            print(
                f"config error: {err} (or set model.vocab_size=N for a dry run without it)", file=sys.stderr
            )
            return 2
    print(describe_job(cfg, world_size))
    if unready is not None:
        print(f"not launchable here yet: {unready}", file=sys.stderr)
        return 2
    return 0


def torchrun(args: list[str]) -> int:
    """Run torchrun (``python -m torch.distributed.run ARGS``) in this process, its command printed
    first; a failed worker raises torchrun's ChildFailedError (exit 1, its report), as torchrun does."""
    from torch.distributed.run import main as torchrun_main

    print(" ".join([sys.executable, "-m", "torch.distributed.run", *args]), flush=True)
    torchrun_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
