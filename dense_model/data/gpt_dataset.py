"""Training datasets: megatron-core's GPTDataset over our mmap datasets, blended by weight.

    from dense_model.data.blend import load_blend
    from dense_model.data.gpt_dataset import build_gpt_datasets
    prefixes, weights = load_blend("data/red_blend.json")
    train, valid, test = build_gpt_datasets(prefixes, weights, tokenizer=tok, seq_length=4096, seed=1234,
                                            split="969,30,1", num_samples=(n_train, n_valid, n_test),
                                            cache_dir="runs/x/data_cache")
    train[0] -> {"tokens", "labels", "attention_mask", "loss_mask", "position_ids"}   # each [seq_length]

Built by `BlendedMegatronDatasetBuilder(GPTDataset, ...)`: shuffled samples, document/sample/
shuffle indexes cached in `cache_dir` (rank 0 builds them first, the other ranks then load them).
Works with or without an initialised torch.distributed group. In a multi-node group the cache
folder must be one all nodes share: `check_cache_dir_is_shared` says so in one line before building.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
import uuid
import warnings
from collections.abc import Sequence

import torch

from dense_model.data.indexed import read_index_header


@contextlib.contextmanager
def _rank_zero_without_process_group():
    """megatron-core 0.16's BlendedDataset calls torch.distributed.get_rank() without checking
    is_initialized() when it must build its cache, which raises in a single process without a group.
    Without a group this process is the only rank, so answer 0 while the datasets are built."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    original = torch.distributed.get_rank
    torch.distributed.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        torch.distributed.get_rank = original


def _check_splits_have_tokens(prefixes: Sequence[str], split_matrix, split: str) -> None:
    """megatron-core 0.16 loops forever (GPTDataset._get_num_epochs) when a split of a dataset holds
    no tokens; fail with a message instead. Splits are cut by sequence count as megatron does."""
    names = ("train", "valid", "test")
    for prefix in prefixes:
        header = read_index_header(prefix + ".idx")
        lengths = header.lengths()
        n = header.sequence_count
        for name, bounds in zip(names, split_matrix):
            if bounds is None:
                continue
            beg, end = int(round(bounds[0] * float(n))), int(round(bounds[1] * float(n)))
            if end <= beg or int(lengths[beg:end].sum(dtype="int64")) == 0:
                raise ValueError(
                    f"dataset {prefix} has {n} documents: data.split={split!r} leaves its {name} part empty "
                    f"(documents {beg}..{end}). Use more data, or a split that gives {name} nothing "
                    '(e.g. "98,2,0" drops test).'
                )


def split_matrix(split: str) -> list[tuple[float, float] | None]:
    """megatron-core's split matrix of ``split`` (``GPTDatasetConfig.split_matrix``: its
    ``parse_and_normalize_split`` then ``convert_split_vector_to_split_matrix``, in
    megatron/core/datasets/blended_megatron_dataset_config.py), computed the same way without
    importing megatron-core (that module imports its tokenizers: seconds of a launcher's start):
    [(begin, end) or None] for train, valid, test as fractions of a dataset's sequences.
    tests/data/test_gpt_dataset.py compares the two, bit for bit."""
    parts = [float(x) for x in re.findall(r"[.0-9]+", split)]
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)  # float64, summed left to right as numpy.sum does for three numbers
    bounds = list(itertools.accumulate([0.0, *(x / total for x in parts)]))
    return [(beg, end) if end > beg else None for beg, end in zip(bounds, bounds[1:])]


def check_split_against_datasets(prefixes: Sequence[str], split: str) -> None:
    """The check before launch: ``split`` cut as megatron-core cuts it (``split_matrix``,
    ``round(bound * sequence count)`` per dataset) against each dataset's .idx header, no .bin read;
    ValueError (one line naming the dataset, the part and the fix) where a part would be empty."""
    _check_splits_have_tokens([str(p) for p in prefixes], split_matrix(split), split)


class CacheDirNotSharedError(RuntimeError):
    """Some nodes do not see the dataset cache folder that global rank 0 writes."""


def check_cache_dir_is_shared(cache_dir: str) -> None:
    """Stop, on every rank, when a node cannot see `cache_dir`: rank 0 builds the index cache there
    and all ranks read it, so a node-local folder fails later with a bare FileNotFoundError. Rank 0
    writes a marker file; the first rank of each node (LOCAL_RANK 0) looks for it. No-op without a
    process group."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    rank = dist.get_rank()
    name = [f".visible-{uuid.uuid4().hex}" if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    marker = os.path.join(cache_dir, name[0])
    if rank == 0:
        os.makedirs(cache_dir, exist_ok=True)
        with open(marker, "w") as f:
            f.write(socket.gethostname())
    dist.barrier()
    first_on_node = os.environ.get("LOCAL_RANK", "0") == "0"
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (socket.gethostname(), rank, not first_on_node or os.path.exists(marker)))
    dist.barrier()
    if rank == 0:
        os.remove(marker)
    blind = [f"{host} (rank {r})" for host, r, ok in seen if not ok]
    if blind:
        raise CacheDirNotSharedError(
            f"data.cache_dir {cache_dir} is not visible from {', '.join(blind)}: global rank 0 builds the "
            "dataset index cache there and every rank reads it, so it must be on a filesystem all nodes "
            "share; set data.cache_dir to such a folder."
        )


def build_gpt_datasets(
    prefixes: Sequence[str],
    weights: Sequence[float] | None,
    *,
    tokenizer,
    seq_length: int,
    seed: int,
    split: str,
    num_samples: tuple[int, int, int],
    cache_dir: str,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
):
    """(train, valid, test) datasets (None where the split is empty) over the blended prefixes.

    `prefixes`: dataset prefixes (no .bin/.idx); `weights`: one per prefix, or None to weight by
    size. `split`: megatron's "train,valid,test" proportions of each dataset's documents, e.g.
    "969,30,1". `num_samples`: samples wanted per split (the blend is sized to give at least these).
    `tokenizer`: from `dense_model.data.tokenizers.build_tokenizer` (eod, pad, vocab_size).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes = [str(p) for p in prefixes]
    if not prefixes:
        raise ValueError("build_gpt_datasets: no dataset prefixes given")
    if weights is not None:
        weights = [float(w) for w in weights]
        if len(weights) != len(prefixes):
            raise ValueError(f"build_gpt_datasets: {len(prefixes)} prefixes but {len(weights)} weights")
    if len(num_samples) != 3:
        raise ValueError("build_gpt_datasets: num_samples must be (train, valid, test)")
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        mmap_bin_files=True,
    )
    _check_splits_have_tokens(prefixes, config.split_matrix, split)
    check_cache_dir_is_shared(cache_dir)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config)
    with warnings.catch_warnings(), _rank_zero_without_process_group():
        if tokenizer.pad == tokenizer.eod:
            # Our tokenizers use EOD as PAD when the model has no pad token; megatron-core then warns
            # and masks nothing as padding, which is the right behaviour for packed pretraining data.
            warnings.filterwarnings("ignore", message="The pad token id in the tokenizer collides")
        train, valid, test = builder.build()
    return train, valid, test
