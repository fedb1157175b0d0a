"""lm-eval on an MoE checkpoint: our lm-eval model loads it through the same builder and its
loglikelihoods equal those computed by hand from the loaded model's logits; so do those of lm-eval's
own ``hf`` model on the Hugging Face export (trust_remote_code)."""

import json
from pathlib import Path

import pytest
import torch

from dense_model.testing import offline_env, spawn_workers, tiny_model_overrides

VOCAB, SEQ = 512, 64
REQUESTS = [("The function returns", " a list"), ("Python is", " a language"), ("x =", " 1")]


def _job(rank, world_size, out_dir, tokenizer):
    from lm_eval.api.instance import Instance

    from dense_model.checkpoint import save_checkpoint
    from dense_model.checkpoint.inference import load_model_for_inference
    from dense_model.config import load_config
    from dense_model.evaluation import DenseModelLM
    from dense_model.export import export_hf
    from dense_model.model import build_model
    from dense_model.parallel import initialize_parallel

    cfg = load_config(
        None,
        [
            *tiny_model_overrides(vocab=VOCAB, seq=SEQ),
            "model.moe.num_experts=4",
            "model.moe.router_topk=2",
            "model.moe.ffn_hidden_size=32",
            "model.init_method_std=0.1",  # O(1) logits, so scores differ
            f"data.tokenizer_model={tokenizer}",
            "training.recompute_granularity=none",
        ],
    )
    initialize_parallel(1, 1, seed=5)
    model = build_model(cfg)
    with torch.no_grad():  # move the experts' PolyNorm coefficients off their init
        for name, param in model.named_parameters():
            if ".activation_func." in name:
                param.add_(0.3 * torch.randn(param.shape))
    run = Path(out_dir) / "run"
    save_checkpoint(run / "checkpoints", 2, model, cfg)

    loaded = load_model_for_inference(run)
    tok = loaded.tokenizer
    hand = []
    for context, continuation in REQUESTS:
        ctx, cont = tok.encode(context), tok.encode(context + continuation)[len(tok.encode(context)) :]
        seq = (ctx + cont)[:-1]
        with torch.no_grad():
            logits = loaded.model(torch.tensor([seq]), torch.arange(len(seq))[None], None)[0, :, :VOCAB]
        rows = torch.log_softmax(logits.float(), dim=-1)[len(ctx) - 1 :]  # [len(cont), vocab]
        hand.append(float(rows.gather(-1, torch.tensor(cont)[:, None]).sum()))
    lm = DenseModelLM(pretrained=str(run), batch_size=2)
    ours = lm.loglikelihood(
        [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=0) for r in REQUESTS]
    )
    export_hf(run, Path(out_dir) / "hf", dtype="float32")
    result = {"hand": hand, "ours": [s for s, _ in ours]}
    Path(out_dir, "scores.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_lm_eval_model_scores_an_moe_checkpoint(tmp_path, spm_model, monkeypatch):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    spawn_workers(_job, 1, str(tmp_path), spm_model)
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert len(set(round(s, 3) for s in scores["hand"])) == len(REQUESTS)  # a real spread
    for ours, hand in zip(scores["ours"], scores["hand"], strict=True):
        assert ours == pytest.approx(hand, abs=1e-4)
    # lm-eval's own hf model on the export (DenseModelSparseMoeBlock) scores the same
    for key, value in offline_env(tmp_path).items():
        if key.startswith("HF_"):
            monkeypatch.setenv(key, value)
    hf = HFLM(
        pretrained=str(tmp_path / "hf"), trust_remote_code=True, dtype="float32", device="cpu", batch_size=2
    )
    theirs = hf.loglikelihood(
        [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=0) for r in REQUESTS]
    )
    for (score, _), hand in zip(theirs, scores["hand"], strict=True):
        assert score == pytest.approx(hand, abs=1e-4)
