"""Named held-out validation sets (``data.validation_sets: {NAME: PREFIX or blend file}``).

Each set (e.g. ``c4: data/c4_val_text_document``, ``wikipedia: data/wiki_val_blend.json``) is read
as a whole through megatron-core's GPTDataset (split ``1,0,0``: every document of the set, none held
back for a test split) with the training seed, so its sample order is fixed for the run. At every
evaluation the trainer scores the same first ``samples`` of it: ``min(logging.eval_iters, whole
batches in the set)`` global batches, DP-sharded as training batches are. The training blend and
its train/valid split are untouched.

    sets = resolve_validation_sets(cfg.data.validation_sets)        # {name: (prefixes, weights)}
    check_validation_sets(sets, seq_length=..., global_batch_size=...)  # one line, .idx headers
    check_validation_tokens(sets, vocab_size=...)  # one line, scans the .bin files
    dataset, samples = build_validation_set(sets["c4"], ..., eval_iters=20)

The pre-launch checks: ``check_validation_sets`` (config/rules.py runs it at every config load) and
``check_validation_tokens`` (the launcher's ``check_data``, once before launch): a missing prefix, a
set shorter than one global batch or a token id outside the tokenizer's vocabulary is one line
naming the set and the fix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from dense_model.data.blend import load_blend
from dense_model.data.gpt_dataset import build_gpt_datasets
from dense_model.data.indexed import read_index_header

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a metrics key part: valid/NAME/loss
_CHUNK = 1 << 24  # tokens per chunk of the vocabulary scan


def resolve_validation_sets(sets: Mapping[str, str]) -> dict[str, tuple[list[str], list[float] | None]]:
    """{name: (prefixes, weights)}: a ``.json`` value is a blend file (its prefixes and weights),
    ``demo:SUBSET`` the demo sample's held-out documents of SUBSET (``data.demo.demo_heldout_prefix``),
    anything else one dataset prefix (weights None). ValueError, one line naming the set, for a bad
    name, a missing .bin/.idx or a malformed blend file."""
    out = {}
    for name, spec in sets.items():
        where = f"data.validation_sets.{name}"
        if not isinstance(name, str) or not NAME.match(name):
            raise ValueError(
                f"data.validation_sets: name {name!r} is not usable as a metrics key; use letters, digits, "
                "'_', '.' or '-' (e.g. c4, wikipedia)"
            )
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"{where}: {spec!r} is not a dataset prefix or a blend file path")
        if spec.startswith("demo:"):  # the demo's held-out part of one subset (data/demo.py)
            from dense_model.data.demo import demo_heldout_prefix

            try:
                spec = demo_heldout_prefix(spec.removeprefix("demo:"))
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        if spec.endswith(".json"):
            try:
                prefixes, weights = load_blend(spec)
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{where}: {err}") from None
        else:
            for ext in (".bin", ".idx"):
                if not os.path.isfile(spec + ext):
                    raise ValueError(
                        f"{where}: {spec}{ext} does not exist; give the prefix of a dataset written by "
                        "preprocess_data.py (PREFIX_text_document, without .bin/.idx) or a blend .json"
                    )
            prefixes, weights = [spec], None
        out[name] = (prefixes, weights)
    return out


def set_samples(prefixes: Sequence[str], seq_length: int) -> int:
    """Samples of ``seq_length`` tokens in one pass over the set (as GPTDataset cuts one epoch:
    one extra token per sample for the labels)."""
    total = 0
    for prefix in prefixes:
        tokens = int(read_index_header(prefix + ".idx").lengths().sum(dtype="int64"))
        total += max(tokens - 1, 0) // seq_length
    return total


def max_token_id(prefix: str) -> int:
    """The largest token id in the dataset's .bin (a streamed scan; -1 when it is empty)."""
    header = read_index_header(prefix + ".idx")
    size = os.path.getsize(prefix + ".bin") // header.itemsize
    if size == 0:
        return -1
    data = np.memmap(prefix + ".bin", dtype=header.dtype, mode="r", shape=(size,))
    return max(int(data[i : i + _CHUNK].max()) for i in range(0, size, _CHUNK))


def check_validation_sets(
    sets: Mapping[str, tuple[list[str], list[float] | None]],
    *,
    seq_length: int,
    global_batch_size: int,
) -> None:
    """ValueError, one line naming the set, when a set has fewer samples than one global batch
    (its .idx headers only: cheap enough for every config load, config/rules.py)."""
    for name, (prefixes, _) in sets.items():
        samples = set_samples(prefixes, seq_length)
        if samples < global_batch_size:
            raise ValueError(
                f"data.validation_sets.{name}: {samples} samples of {seq_length} tokens, fewer than one "
                f"global batch (training.global_batch_size={global_batch_size}); give a larger held-out set"
            )


def check_validation_tokens(
    sets: Mapping[str, tuple[list[str], list[float] | None]], *, vocab_size: int
) -> None:
    """ValueError, one line naming the set, when a set holds a token id the tokenizer does not have
    (made with another tokenizer). Scans every .bin: the launcher's data check runs it once, before
    launch, not every rank at every config load."""
    for name, (prefixes, _) in sets.items():
        for prefix in prefixes:
            top = max_token_id(prefix)
            if top >= vocab_size:
                raise ValueError(
                    f"data.validation_sets.{name}: {prefix} holds token id {top}, outside the tokenizer's "
                    f"vocabulary of {vocab_size}: it was tokenised with another tokenizer; re-tokenise it "
                    "with data.tokenizer_model"
                )


def evaluated_samples(
    prefixes: Sequence[str], seq_length: int, global_batch_size: int, eval_iters: int
) -> int:
    """Samples scored per evaluation: ``eval_iters`` global batches, at most the whole set's."""
    batches = min(eval_iters, set_samples(prefixes, seq_length) // global_batch_size)
    return batches * global_batch_size


def build_validation_set(
    prefixes: Sequence[str],
    weights: Sequence[float] | None,
    *,
    tokenizer,
    seq_length: int,
    seed: int,
    global_batch_size: int,
    eval_iters: int,
    cache_dir: str,
    eod_mask_loss: bool = False,
):
    """(dataset, samples): the set's GPTDataset over all its documents (split 1,0,0) and the number
    of its first samples each evaluation scores (a multiple of ``global_batch_size``)."""
    samples = evaluated_samples(prefixes, seq_length, global_batch_size, eval_iters)
    dataset, _, _ = build_gpt_datasets(
        prefixes,
        weights,
        tokenizer=tokenizer,
        seq_length=seq_length,
        seed=seed,
        split="1,0,0",
        num_samples=(samples, 0, 0),
        cache_dir=cache_dir,
        eod_mask_loss=eod_mask_loss,
    )
    return dataset, samples
