"""Continued pretraining from a Hugging Face import: ``run_pretrain.sh OUT/config.yaml run_dir=NEW
data.blend=...`` on the demo data starts at step 0 from the imported weights (said in the log),
trains 10 steps with finite losses, and its first loss is the loss transformers' model gives on
that same batch (to 1e-4); a relaunch of NEW resumes NEW, not the import.

Megatron runs in the launched job and in a spawned process; transformers runs here.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from dense_model.testing import spawn_workers
from tests.export.test_import_hf import import_cli, llama_config
from tests.training.pretrain_jobs import finish, launch, read_metrics, trained_ok

pytestmark = pytest.mark.slow
SEQ, BATCH = 64, 4
TRAIN = [
    "training.train_iters=10",
    f"training.global_batch_size={BATCH}",
    f"training.micro_batch_size={BATCH}",
    "training.lr_warmup_iters=2",
    "training.bf16=false",
    "training.recompute_granularity=none",
    "parallel.use_distributed_optimizer=false",
    "logging.log_interval=1",
    "logging.eval_interval=0",
    "checkpoint.save_interval=10",
    "data.num_workers=0",
    "data.split=90,10,0",
]


def _first_batch_job(rank, world_size, run_dir, out):
    """The first global batch the run trained on: samples [0, BATCH) of its train dataset, rebuilt
    from its resolved config and dataset cache."""
    from dense_model.config import load_config
    from dense_model.data.tokenizers import build_tokenizer
    from dense_model.training.batches import build_datasets

    cfg = load_config(Path(run_dir) / "config.yaml")
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    train, _ = build_datasets(cfg, cfg.training.train_iters, tokenizer)
    samples = [train[i] for i in range(cfg.training.global_batch_size)]
    batch = {
        k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in ("tokens", "labels", "loss_mask")
    }
    torch.save(batch, out)


def test_training_continues_from_an_import(tmp_path):
    from transformers import LlamaForCausalLM

    from dense_model.data.demo import DEMO_VOCAB_SIZE, prepare_demo_dataset

    demo = prepare_demo_dataset(str(tmp_path / "demo_data"))
    hf = tmp_path / "hf"
    torch.manual_seed(0)
    fields = dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=50000.0, rms_norm_eps=1e-5)
    config = llama_config(**fields)
    config.vocab_size = DEMO_VOCAB_SIZE
    config.initializer_range = 0.02
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(hf)
    shutil.copy2(demo["tokenizer_model"], hf / "tokenizer.model")  # a SentencePiece-only folder
    result = import_cli([hf, tmp_path / "imported"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = tmp_path / "imported"
    assert json.loads((imported / "checkpoints/iter_0000000/dense_model.json").read_text())["tokenizer"][
        "type"
    ] == ("sentencepiece")

    new = tmp_path / "new"
    code, out = finish(
        launch(imported / "config.yaml", f"run_dir={new}", f"data.blend={demo['blend']}", *TRAIN)
    )
    assert code == 0, out
    assert f"loaded the model weights of {imported}/checkpoints/iter_0000000" in out, out
    assert "training starts at step 0 with a fresh optimizer" in out, out
    losses, _ = read_metrics(new)
    assert sorted(losses) == list(range(1, 11))
    assert all(math.isfinite(v) for v in losses.values())

    spawn_workers(_first_batch_job, 1, str(new), str(tmp_path / "batch.pt"))
    batch = torch.load(tmp_path / "batch.pt")
    with torch.no_grad():
        logits = model(batch["tokens"]).logits.float()  # [b, s, vocab]
    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), reduction="none"
    )
    mask = batch["loss_mask"].reshape(-1).float()
    hf_loss = float((per_token * mask).sum() / mask.sum())
    assert losses[1] == pytest.approx(hf_loss, abs=1e-4), (losses[1], hf_loss)
    assert losses[10] < losses[1]  # it trains

    # a relaunch of NEW resumes NEW (its step 10), not the import
    out = trained_ok(imported / "config.yaml", f"run_dir={new}", f"data.blend={demo['blend']}", *TRAIN[1:],
                     "training.train_iters=11")  # fmt: skip
    assert f"resumed from {new}/checkpoints/iter_0000010 at step 10 (its own checkpoint" in out, out
    assert sorted(read_metrics(new)[0]) == list(range(1, 12))
