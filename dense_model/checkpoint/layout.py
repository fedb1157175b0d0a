"""The checkpoint format on disk: names, the tracker file, metadata, atomic writes.

Layout of a run directory (Megatron-LM's names, so its users find their way)::

    RUN_DIR/checkpoints/latest_checkpointed_iteration.txt     "1200"
    RUN_DIR/checkpoints/iter_0001200/                         dist_checkpointing files
        dense_model.json     iteration, resolved config, tokenizer (type and file name)
        config.yaml          the same config, for people
        tokenizer.model      a copy of the tokenizer (or tokenizer/ for Hugging Face ones)

No torch.distributed here: these read and write plain files, for the trainer, the evaluation and
the export alike.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from dense_model.config import Config, config_to_dict, save_config

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "dense_model.json"
CHECKPOINTS = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint path that does not exist or is not one of ours; the message says which and why."""


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def read_latest_iteration(root: str | os.PathLike) -> int | None:
    """The iteration the tracker file points at, or None when there is no checkpoint."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number; delete it or fix it")
    return int(text)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory, its checkpoints/ folder or one iter_NNNNNNN folder -> that iteration's folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / METADATA).is_file():
        return path
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    latest = read_latest_iteration(root)
    if latest is None:
        raise CheckpointError(
            f"{path} is not a dense_model checkpoint: expected a run directory with {CHECKPOINTS}/{TRACKER}, "
            f"a checkpoints folder with {TRACKER}, or an iter_NNNNNNN folder with {METADATA}"
        )
    folder = iteration_dir(root, latest)
    if not (folder / METADATA).is_file():
        raise CheckpointError(
            f"{root / TRACKER} points at iteration {latest} but {folder / METADATA} is missing"
        )
    return folder


def read_metadata(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / METADATA).read_text())


def fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_metadata(folder: Path, iteration: int, cfg: Config) -> None:
    """dense_model.json (iteration, resolved config, tokenizer copy) and config.yaml into ``folder``."""
    meta = {
        "format": "dense_model/1",
        "iteration": iteration,
        "config": config_to_dict(cfg),
        "tokenizer": _copy_tokenizer(cfg, folder),
    }
    fsync_write(folder / METADATA, json.dumps(meta, indent=2))
    save_config(cfg, folder / "config.yaml")


def publish(tmp: Path, final: Path, root: Path, iteration: int, keep_last: int | None) -> None:
    """Rename a complete ``iter_N.tmp`` into place, then move the tracker (write + fsync + rename)."""
    if final.exists():  # re-saving the same iteration (e.g. SIGTERM right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_write(root / TRACKER, str(iteration))
    if keep_last:
        _prune(root, keep_last)


def _copy_tokenizer(cfg: Config, folder: Path) -> dict | None:
    model_path = cfg.data.tokenizer_model
    if not model_path:
        return None
    src = Path(model_path)
    if src.is_dir():
        shutil.copytree(src, folder / "tokenizer")
        name = "tokenizer"
    else:
        name = "tokenizer" + (src.suffix or ".model")
        shutil.copy2(src, folder / name)
    return {"type": cfg.data.tokenizer_type, "file": name}


def _prune(root: Path, keep_last: int) -> None:
    folders = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in folders[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
