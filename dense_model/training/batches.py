"""Training and validation batches from megatron-core's GPTDataset, resumable by sample count.

A global batch of G samples at step s is samples [s*G, (s+1)*G) of the (shuffled, blended) train
dataset; data-parallel rank r takes the contiguous block r of it and cuts it into micro-batches.
The data position is therefore just the number of consumed samples, and the samples a step sees
do not depend on the data-parallel size (DP=2 and DP=1 with the same global batch agree).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from dense_model.config import Config
from dense_model.data.blend import load_blend
from dense_model.data.gpt_dataset import build_gpt_datasets
from dense_model.data.repetition import is_repetitive
from dense_model.model import model_device


def build_datasets(cfg: Config, train_iters: int, tokenizer):
    """(train, valid) datasets for the config's blend; valid may be None."""
    d, t = cfg.data, cfg.training
    if d.blend:
        prefixes, weights = load_blend(d.blend)
    elif d.paths:
        prefixes, weights = list(d.paths), d.weights
    else:
        raise ValueError("no training data: set data.blend (a blend file) or data.paths (mmap prefixes)")
    global_batch = t.global_batch_size
    eval_samples = cfg.logging.eval_iters * global_batch
    n_evals = train_iters // max(cfg.logging.eval_interval, 1) + 1
    cache_dir = d.cache_dir or str(Path(cfg.run_dir) / "data_cache")
    train, valid, _ = build_gpt_datasets(
        prefixes,
        weights,
        tokenizer=tokenizer,
        seq_length=cfg.model.seq_length,
        seed=t.seed if t.data_seed is None else t.data_seed,
        split=d.split,
        num_samples=(train_iters * global_batch, eval_samples * n_evals, 0),
        cache_dir=cache_dir,
        eod_mask_loss=t.eod_mask_loss,
    )
    return train, valid


class _GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this DP rank's micro-batches (lists of sample indices), step after step."""

    def __init__(self, num_samples, start_sample, global_batch, micro_batch, dp_rank, dp_size, wrap):
        self.num_samples, self.start = num_samples, start_sample
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size, self.wrap = dp_rank, dp_size, wrap

    def __iter__(self):
        per_rank = self.global_batch // self.dp_size
        first = self.start
        while True:
            if first + self.global_batch > self.num_samples:
                if not self.wrap:
                    return
                first = 0
            base = first + self.dp_rank * per_rank
            for m in range(0, per_rank, self.micro_batch):
                yield list(range(base + m, base + m + self.micro_batch))
            first += self.global_batch


def batch_iterator(
    dataset,
    cfg,
    consumed_samples: int,
    wrap: bool = False,
    num_workers: int | None = None,
    device: torch.device | None = None,
    filter_repeats: bool = False,
):
    """An iterator of micro-batch dicts (tokens, labels, loss_mask, position_ids) for this rank,
    on ``device`` (default: the model's, ``dense_model.model.model_device``). With
    ``filter_repeats`` and ``data.repetition_filter.enabled``, samples the filter catches get loss
    mask 0 and the iterator's ``take_filtered()`` counts them."""
    from megatron.core import parallel_state as ps

    t = cfg.training
    sampler = _GlobalBatchSampler(
        len(dataset),
        consumed_samples,
        t.global_batch_size,
        t.micro_batch_size,
        ps.get_data_parallel_rank(),
        ps.get_data_parallel_world_size(),
        wrap,
    )
    workers = cfg.data.num_workers if num_workers is None else num_workers
    rf = cfg.data.repetition_filter
    device = model_device() if device is None else device
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=partial(_collate, rf if filter_repeats and rf.enabled else None),
        # Its own generator: creating an iterator draws a seed, which from the global generator
        # would shift the dropout stream of a resumed run (it restores the RNG, then builds this).
        generator=torch.Generator().manual_seed(t.seed),
        # Page-locked host memory lets the copy below overlap with the GPU's work.
        pin_memory=device.type == "cuda",
    )
    return Batches(loader, device)


class Batches:
    """The loader's micro-batches moved to ``device``, counting the samples the repetition filter masked."""

    def __init__(self, loader, device: torch.device):
        self._it, self.device = iter(loader), device
        self.filtered = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = next(self._it)
        filtered = batch.pop("filtered", None)
        if filtered is not None:  # counted on the host, before the copy: no device sync
            self.filtered += int(filtered.sum())
        return to_device(batch, self.device)

    def take_filtered(self) -> int:
        """Samples masked by the repetition filter since the last call (this rank's micro-batches)."""
        n, self.filtered = self.filtered, 0
        return n


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The micro-batch on ``device`` (asynchronous copies from pinned memory on a GPU)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _collate(repetition_filter, samples):
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys}  # each [b, s]
    if repetition_filter is not None:
        rf = repetition_filter
        # OLMo checks the instance's input ids; a caught sample stays in the batch (the same shapes
        # and the same data position) but adds nothing to the loss or the token count.
        filtered = torch.tensor(
            [is_repetitive(t.numpy(), rf.min_period, rf.max_period, rf.max_count) for t in batch["tokens"]]
        )  # [b]
        batch["loss_mask"] = batch["loss_mask"] * (~filtered).to(batch["loss_mask"].dtype)[:, None]
        batch["filtered"] = filtered
    return batch
