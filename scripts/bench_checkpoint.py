"""Save and load time and peak host memory of a training checkpoint, per distributed-optimizer format.

For each ``checkpoint.optimizer_format`` (``dp_reshardable``: each rank writes its own shard;
``fully_reshardable``: the shards are gathered on every rank first), DP ranks over gloo (fresh
processes per format) build the model with the distributed optimizer, take one optimizer step,
then time ``save_checkpoint`` and ``load_checkpoint`` (same layout: fully parallel load) the way the
trainer calls them. Host memory is each rank's resident set (psutil), sampled every 2 ms: the peak
above the rank's resident set just before the save / load, the largest over ranks.

    python scripts/bench_checkpoint.py                               # CPU, DP=2, a ~15M-parameter model
    python scripts/bench_checkpoint.py --dp 2 model.num_layers=12    # extra args: config overrides
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dense_model.benchmarking import fmt, markdown_table, metadata_lines, run_metadata, write_json  # noqa: E402
from dense_model.testing import spawn_workers  # noqa: E402

FORMATS = ["dp_reshardable", "fully_reshardable"]
MODEL = ["model.num_layers=6", "model.hidden_size=384", "model.num_attention_heads=6"]
MODEL += ["model.swiglu_ffn_hidden_size=1024", "model.vocab_size=8192", "model.seq_length=128"]


class PeakRSS:
    """The largest resident set of this process while the ``with`` block runs, above its start."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.peak = self.start = 0

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.done.wait(0.002)

    def __enter__(self):
        self.start = self.peak = self.process.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def above_start_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def _worker(rank, world_size, optimizer_format, overrides, work, out_file):
    import gc

    import torch

    from dense_model.checkpoint import load_checkpoint, save_checkpoint
    from dense_model.config import load_config
    from dense_model.parallel import initialize_parallel
    from dense_model.training.optim import build_training_model

    initialize_parallel(1, 1, seed=1)
    cfg = load_config(
        None,
        [*MODEL, "parallel.use_distributed_optimizer=true", f"checkpoint.optimizer_format={optimizer_format}"]
        + overrides,
    )
    model, ddp, optimizer = build_training_model(cfg)
    for p in model.parameters():
        p.main_grad.copy_(torch.randn_like(p) * 1e-3)
    optimizer.step()  # Adam moments exist: the state a training checkpoint holds
    root = Path(work) / "checkpoints"
    gc.collect()
    start = time.perf_counter()
    with PeakRSS() as save_mem:
        save_checkpoint(root, 1, ddp, cfg, optimizer, fully_parallel=cfg.checkpoint.fully_parallel_save)
    save_s = time.perf_counter() - start
    gc.collect()
    start = time.perf_counter()
    with PeakRSS() as load_mem:
        load_checkpoint(root, ddp, optimizer)
    load_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    result = {"save_s": save_s, "load_s": load_s, "save_mib": save_mem.above_start_mib}
    result |= {"load_mib": load_mem.above_start_mib, "params": params}
    Path(f"{out_file}.{rank}").write_text(json.dumps(result))


def measure(optimizer_format: str, dp: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "result"
        spawn_workers(_worker, dp, optimizer_format, overrides, work, str(out))
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(dp)]
        folder = next((Path(work) / "checkpoints").glob("iter_*"))
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        shutil.rmtree(Path(work) / "checkpoints")
    worst = {k: max(r[k] for r in ranks) for k in ("save_s", "load_s", "save_mib", "load_mib")}
    return {
        "format": optimizer_format,
        "dp": dp,
        "params": ranks[0]["params"],
        "disk_mib": size / 2**20,
        **worst,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dp", type=int, default=2, help="data-parallel ranks (gloo processes)")
    p.add_argument("--json", help="write the results as JSON here ('-': stdout)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    meta = run_metadata(dp=args.dp)
    rows = [measure(f, args.dp, args.overrides) for f in FORMATS]
    print(metadata_lines(meta))
    print(f"Model: {rows[0]['params'] / 1e6:.1f}M parameters, fp32, DP={args.dp}\n")
    header = ["optimizer format", "save s", "load s", "save peak MiB", "load peak MiB", "on disk MiB"]
    table = [
        [r["format"], fmt(r["save_s"], ".2f"), fmt(r["load_s"], ".2f"), fmt(r["save_mib"], ".0f")]
        + [fmt(r["load_mib"], ".0f"), fmt(r["disk_mib"], ".0f")]
        for r in rows
    ]
    print(markdown_table(header, table))
    write_json(args.json, {"meta": meta, "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
