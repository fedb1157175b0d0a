"""A Hugging Face import, written once at TP=1, loads at TP=2 and PP=2 (dist_checkpointing
reshards it) and scores like the model it came from: our lm-eval model on the import, at TP=1 and
TP=2, gives the per-request log-likelihoods of lm-eval's own ``hf`` model on HF_DIR (within 1e-4).

Megatron runs in spawned processes (gloo); transformers and lm-eval's ``hf`` model run here.
"""

import json
from pathlib import Path

import pytest
import torch

from dense_model.testing import offline_env, spawn_workers
from tests.export.test_import_hf import MODELS, VOCAB, make_hf_model

REQUESTS = [
    ("The function returns", " a list of values"),
    ("Python is", " a programming language"),
    ("x =", " 1"),
    ("def f(n):\n", "    return n + 1"),
    ("Question: what is a tuple?\nAnswer:", " an immutable sequence"),
]


def _instances():
    from lm_eval.api.instance import Instance

    return [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=0) for r in REQUESTS]


def _global_state(model) -> dict:
    from dense_model.model import _global_name

    return {
        _global_name(model, k): v.clone()
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor)
    }


def _tp1_job(rank, world_size, out_dir):
    """Import HF_DIR, score the requests with our lm-eval model, keep the loaded weights."""
    from dense_model.evaluation import DenseModelLM
    from dense_model.export.hf_import import import_hf

    out = Path(out_dir)
    import_hf(out / "hf", out / "run")
    lm = DenseModelLM(pretrained=str(out / "run"), batch_size=2)
    scores = [s for s, _ in lm.loglikelihood(_instances())]
    (out / "scores_tp1.json").write_text(json.dumps(scores))
    torch.save(_global_state(lm.model), out / "state_tp1.pt")


def _tp2_pp2_job(rank, world_size, out_dir):
    """Our lm-eval model at TP=2 (world size 2); then the same checkpoint into a PP=2 model."""
    from megatron.core import parallel_state as ps

    from dense_model.checkpoint import load_checkpoint
    from dense_model.config import load_config
    from dense_model.evaluation import DenseModelLM
    from dense_model.model import build_model
    from dense_model.parallel import initialize_parallel

    out = Path(out_dir)
    lm = DenseModelLM(pretrained=str(out / "run"), batch_size=2)
    assert ps.get_tensor_model_parallel_world_size() == 2
    scores = [s for s, _ in lm.loglikelihood(_instances())]
    if rank == 0:
        (out / "scores_tp2.json").write_text(json.dumps(scores))
    del lm
    ps.destroy_model_parallel()
    cfg = load_config(out / "run" / "config.yaml", ["parallel.pipeline_model_parallel_size=2"])
    initialize_parallel(1, 2)
    model = build_model(cfg, initialize=False)
    load_checkpoint(out / "run", model, load_rng=False)
    torch.save(_global_state(model), out / f"state_pp2_rank{rank}.pt")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, spm_model):
    out = tmp_path_factory.mktemp("layouts")
    make_hf_model(out / "hf", spm_model, max_shard_size="1GB", **MODELS["gqa_untied"])
    spawn_workers(_tp1_job, 1, str(out))
    spawn_workers(_tp2_pp2_job, 2, str(out))
    return out


@pytest.mark.slow
def test_lm_eval_on_import_scores_like_hf_model_at_tp1_and_tp2(layouts, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    for key, value in offline_env(layouts).items():
        if key.startswith("HF_"):
            monkeypatch.setenv(key, value)
    hf = HFLM(pretrained=str(layouts / "hf"), dtype="float32", device="cpu", batch_size=2)
    theirs = [s for s, _ in hf.loglikelihood(_instances())]
    assert len({round(s, 2) for s in theirs}) == len(REQUESTS)  # a real spread
    for tp in (1, 2):
        ours = json.loads((layouts / f"scores_tp{tp}.json").read_text())
        for request, score, ref in zip(REQUESTS, ours, theirs, strict=True):
            assert score == pytest.approx(ref, abs=1e-4), (tp, request)


@pytest.mark.slow
def test_pp2_load_holds_the_tp1_weights(layouts):
    reference = torch.load(layouts / "state_tp1.pt")
    stages = [torch.load(layouts / f"state_pp2_rank{r}.pt") for r in (0, 1)]
    assert "embedding.word_embeddings.weight" in stages[0] and "output_layer.weight" in stages[1]
    assert "decoder.layers.1.self_attention.linear_qkv.weight" in stages[1]
    merged = {**stages[0], **stages[1]}
    assert merged.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(merged[name], tensor), name
    assert reference["embedding.word_embeddings.weight"].shape[0] == VOCAB  # 512: no padding rows
