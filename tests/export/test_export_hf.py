"""Hugging Face export: transformers' own Llama (SwiGLU) and the trust_remote_code model (every other
activation) give our logits; TP=2 and PP=2 checkpoints export the same bytes; the tokenizer
encodes like SentencePiece; bad paths get clear errors.

Megatron runs only in spawned processes (dense_model.testing.spawn_workers) and in the export
CLI's own process; transformers runs here.
"""

import ast
import hashlib
import json
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from dense_model.activations import list_activations
from dense_model.data.tokenizers import SentencePieceTokenizer
from dense_model.testing import offline_env, run_tool, spawn_workers, tiny_model_overrides

REPO = Path(__file__).resolve().parents[2]
EXPORT_CLI = REPO / "toolkits" / "checkpoint_conversion" / "export_hf.py"
VOCAB, SEQ = 512, 64
# name -> (activation, extra overrides). Every registered activation, plus GQA, tied embeddings
# and a non-default PolyNorm order, so that each mapping path is exercised.
SPECS = {act: (act, []) for act in list_activations()}
SPECS["polyrelu"] = ("polyrelu", ["model.num_query_groups=2"])
SPECS["geglu"] = ("geglu", ["model.untie_embeddings=false"])
SPECS["polynorm_order4"] = ("polynorm", ["model.activation_kwargs={order: 4}"])
LAYOUT_SPEC = "polyrelu"  # saved at TP=1 (above), TP=2 and PP=2


def tiny_config(activation, tokenizer, extra=(), tp=1, pp=1):
    from dense_model.config import load_config

    return load_config(
        None,
        [
            *tiny_model_overrides(activation=activation, vocab=VOCAB, seq=SEQ),
            # 576 at TP=1 and TP=2: the export must cut the 64 padding rows
            "model.make_vocab_size_divisible_by=96",
            # larger than the 1B default so that logits are O(1) and a misplaced weight shows
            "model.init_method_std=0.1",
            f"data.tokenizer_model={tokenizer}",
            f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.pipeline_model_parallel_size={pp}",
            "training.recompute_granularity=none",
            *extra,
        ],
    )


@torch.no_grad()
def perturb(model, seed=5):
    """Move norms and PolyCom scalars off their init (ones; 1/r and 0), keyed by global parameter
    name so every TP/PP layout gets the same values (like dense_model.model.initialize_weights)."""
    for name, param in model.named_parameters():
        if "layernorm" not in name and ".activation_func." not in name:
            continue
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
        gen = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(".".join(parts).encode()))
        param.add_(0.3 * torch.randn(param.shape, generator=gen))


def _build_save(spec, tokenizer, root, tp=1, pp=1):
    from dense_model.checkpoint import save_checkpoint
    from dense_model.model import build_model

    activation, extra = SPECS[spec]
    cfg = tiny_config(activation, tokenizer, extra, tp, pp)
    model = build_model(cfg)  # initialize_weights: the same weights at every layout
    perturb(model)
    save_checkpoint(Path(root) / spec / "checkpoints", 7, model, cfg)
    return model


def _tp1_job(rank, world_size, out_dir, tokenizer, tokens_file):
    """Save every spec at TP=1, export it in-process, and record our logits on the random tokens."""
    from dense_model.checkpoint.inference import load_model_for_inference
    from dense_model.export import export_hf
    from dense_model.parallel import initialize_parallel

    initialize_parallel(1, 1)
    tokens = torch.load(tokens_file)  # [b, s]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = {}
    for spec in SPECS:
        _build_save(spec, tokenizer, Path(out_dir) / "tp1", 1, 1)
        export_hf(Path(out_dir) / "tp1" / spec, Path(out_dir) / "hf" / spec, dtype="float32")
        loaded = load_model_for_inference(Path(out_dir) / "tp1" / spec)
        with torch.no_grad():
            logits[spec] = loaded.model(tokens, positions, None)[..., :VOCAB].clone()  # [b, s, vocab]
    torch.save(logits, Path(out_dir) / "logits_tp1.pt")


def _layout_job(rank, world_size, out_dir, tokenizer, tokens_file):
    """Save LAYOUT_SPEC at TP=2 (recording its TP=2 logits), then at PP=2."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from dense_model.parallel import initialize_parallel

    initialize_parallel(2, 1)
    model = _build_save(LAYOUT_SPEC, tokenizer, Path(out_dir) / "tp2", tp=2)
    model.eval()
    tokens = torch.load(tokens_file)
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)  # [b, s, 576/2]
        logits = gather_from_tensor_model_parallel_region(logits)[..., :VOCAB]
    if rank == 0:
        torch.save(logits, Path(out_dir) / "logits_tp2.pt")
    ps.destroy_model_parallel()
    initialize_parallel(1, 2)
    _build_save(LAYOUT_SPEC, tokenizer, Path(out_dir) / "pp2", pp=2)


def _te_checkpoint_job(rank, world_size, out_dir, tokenizer):
    """A checkpoint whose config says Transformer Engine, on a machine without it (this one): eval and
    export load it into the local layers. Saved here from local layers; what lets a real TE checkpoint
    load the same way is that megatron-core's local spec names its norms as TE's fused norm+linear
    does, which the key check below pins."""
    from dense_model.checkpoint import save_checkpoint
    from dense_model.checkpoint.inference import load_model_for_inference
    from dense_model.model import build_model, transformer_engine_available
    from dense_model.parallel import initialize_parallel

    assert not transformer_engine_available()
    initialize_parallel(1, 1)
    cfg = tiny_config("polynorm", tokenizer)
    model = build_model(cfg)
    perturb(model)
    keys = [v.key for v in model.sharded_state_dict().values()]  # the names inside the checkpoint
    assert any(k.endswith("self_attention.linear_qkv.layer_norm_weight") for k in keys), keys
    assert any(k.endswith("mlp.linear_fc1.layer_norm_weight") for k in keys), keys
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in keys), keys
    cfg.model.transformer_impl = "transformer_engine"
    save_checkpoint(Path(out_dir) / "checkpoints", 5, model, cfg)
    loaded = load_model_for_inference(Path(out_dir))
    assert loaded.config.model.transformer_impl == "local"
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    positions = torch.arange(SEQ).expand_as(tokens)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(tokens, positions, None), model(tokens, positions, None), rtol=0, atol=0
        )


def test_transformer_engine_checkpoint_loads_without_te(tmp_path, spm_model):
    spawn_workers(_te_checkpoint_job, 1, str(tmp_path / "run"), spm_model)
    result = export_cli([tmp_path / "run", tmp_path / "hf", "--dtype", "float32"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained with model.transformer_impl=transformer_engine" in result.stderr
    assert (tmp_path / "hf" / "config.json").is_file()


def export_cli(args, tmp):
    return run_tool(EXPORT_CLI, args, tmp)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, spm_model):
    out = tmp_path_factory.mktemp("export")
    tokens = torch.randint(0, VOCAB, (2, SEQ))  # fresh random tokens each run
    torch.save(tokens, out / "tokens.pt")
    spawn_workers(_tp1_job, 1, str(out), spm_model, str(out / "tokens.pt"))
    spawn_workers(_layout_job, 2, str(out), spm_model, str(out / "tokens.pt"))
    for layout in ("tp2", "pp2"):
        result = export_cli([out / layout / LAYOUT_SPEC, out / "hf_from" / layout, "--dtype", "float32"], out)
        assert result.returncode == 0, result.stderr[-3000:]
    return out


def hf_logits(folder: Path, tokens: torch.Tensor, remote: bool):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if remote:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    else:
        model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model, model(tokens).logits  # [b, s, vocab]


@pytest.mark.slow
@pytest.mark.parametrize("spec", list(SPECS))
def test_exported_model_gives_our_logits(exported, spec, spm_model):
    tokens = torch.load(exported / "tokens.pt")
    ours = torch.load(exported / "logits_tp1.pt")[spec]
    folder = exported / "hf" / spec
    config = json.loads((folder / "config.json").read_text())
    swiglu = SPECS[spec][0] == "swiglu"
    model, logits = hf_logits(folder, tokens, remote=not swiglu)
    if swiglu:  # plain Llama: no custom code in the folder
        assert config["model_type"] == "llama" and "auto_map" not in config
        assert not list(folder.glob("*.py"))
        assert type(model).__name__ == "LlamaForCausalLM"
    else:
        assert config["model_type"] == "dense_model" and config["activation"] == SPECS[spec][0]
        assert type(model).__name__ == "DenseModelForCausalLM"
    # dense_model.json names the tokenizer the export was made from (the checkpoint's copy) and its sha256
    tokenizer = json.loads((folder / "dense_model.json").read_text())["tokenizer"]
    assert tokenizer["sha256"] == hashlib.sha256(Path(spm_model).read_bytes()).hexdigest()
    assert tokenizer["source"].endswith("tokenizer.model") and tokenizer["exported_as"] == "tokenizer.json"
    assert ours.abs().max() > 1.0  # logits far from uniform: the comparison means something
    diff = (logits - ours).abs().max().item()
    assert diff < 1e-4, f"{spec}: max |HF - ours| = {diff:.3g}"


@pytest.mark.slow
def test_polycom_weights_are_named_and_standalone(exported):
    from safetensors.torch import load_file

    folder = exported / "hf" / "polynorm_order4"
    weights = load_file(folder / "model.safetensors")
    assert weights["model.layers.1.mlp.act_fn.weight"].shape == (4,)
    assert weights["model.layers.1.mlp.act_fn.bias"].shape == (1,)
    assert "model.layers.1.mlp.gate_proj.weight" not in weights
    # the modeling files import only torch and transformers (loaded where dense_model is absent)
    for name in ("modeling_dense_model.py", "configuration_dense_model.py"):
        tree = ast.parse((folder / name).read_text())
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert all(m.split(".")[0] in ("torch", "transformers") for m in modules), modules
    code = (
        "import sys; sys.modules['dense_model'] = None\n"  # any import of dense_model now fails
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        "print(type(m).__name__, m.model.layers[0].mlp.act_fn)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=offline_env(exported)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DenseModelForCausalLM PolyNorm(order=4, inner=norm" in result.stdout


@pytest.mark.slow
def test_any_layout_exports_the_same(exported):
    from safetensors.torch import load_file

    reference = load_file(exported / "hf" / LAYOUT_SPEC / "model.safetensors")
    for layout in ("tp2", "pp2"):
        folder = exported / "hf_from" / layout
        weights = load_file(folder / "model.safetensors")
        assert weights.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.equal(weights[name], tensor), f"{layout}: {name} differs"
        assert (folder / "config.json").read_text() == (
            exported / "hf" / LAYOUT_SPEC / "config.json"
        ).read_text()
    # and the TP=2 export gives the logits the TP=2 model computed before saving
    tokens = torch.load(exported / "tokens.pt")
    _, logits = hf_logits(exported / "hf_from" / "tp2", tokens, remote=True)
    diff = (logits - torch.load(exported / "logits_tp2.pt")).abs().max().item()
    assert diff < 1e-4, f"TP=2 export: max |HF - ours| = {diff:.3g}"


def _texts() -> list[str]:
    import pydoc_data.topics
    import random

    corpus = "\n\n".join(pydoc_data.topics.topics.values())
    rng = random.Random()  # fresh samples each run
    texts = [
        corpus[i : i + rng.randrange(1, 400)] for i in (rng.randrange(len(corpus) - 400) for _ in range(200))
    ]
    return texts + [
        "",
        " ",
        "Question: Which keyword starts a function?\nAnswer: def",
        "  leading and trailing  ",
        "tabs\tand\n\nnewlines\r\n",
        "double  spaces   here",
        "ﬁ ligature ① ｆｕｌｌｗｉｄｔｈ",
        "émigré naïve 日本語 🙂",
    ]


def test_tokenizer_encodes_like_sentencepiece(spm_model, tmp_path):
    import sentencepiece
    from transformers import AutoTokenizer

    from dense_model.export.tokenizer import export_tokenizer

    exported = export_tokenizer("sentencepiece", spm_model, tmp_path / "tok", model_max_length=SEQ)
    sp = sentencepiece.SentencePieceProcessor(model_file=spm_model)
    hf = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert exported.special_ids == {
        "bos_token_id": sp.eos_id(),
        "eos_token_id": sp.eos_id(),
        "pad_token_id": None,
    }
    assert exported.provenance["exported_as"] == "tokenizer.json"
    assert (hf.bos_token_id, hf.eos_token_id, len(hf)) == (sp.eos_id(), sp.eos_id(), sp.vocab_size())
    texts = _texts()
    for text in texts:
        expected = sp.encode(text)
        got = hf(text)["input_ids"]  # the default call adds nothing: pretraining had no BOS
        assert got == expected, repr(text)
        assert hf.decode(got) == sp.decode(expected), repr(text)
    # Generated text (lm-eval: skip_special_tokens=True) reads the same through both, also when the
    # model emits <unk>, BOS or EOS mid-text (SentencePiece alone would render <unk> as " \u2047 ").
    ours = SentencePieceTokenizer(spm_model)
    specials = [i for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)]
    assert sp.unk_id() in specials and sp.eos_id() in specials
    for text in texts[-6:]:
        ids = sp.encode(text)
        mixed = [specials[k % len(specials)] if k % 3 == 1 else t for k, t in enumerate(ids)] + specials
        assert ours.decode(mixed, skip_special_tokens=True) == hf.decode(mixed, skip_special_tokens=True)
        assert ours.decode(mixed, skip_special_tokens=True) == sp.decode(
            [t for t in mixed if t not in specials]
        )
    assert ours.decode([sp.unk_id()]) != "" == ours.decode([sp.unk_id()], skip_special_tokens=True)
    # a Hugging Face tokenizer folder (here: the exported one) is re-exported unchanged
    export_tokenizer("huggingface", tmp_path / "tok", tmp_path / "tok2")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok2")
    assert [again(t)["input_ids"] for t in texts] == [sp.encode(t) for t in texts]


def test_export_errors(tmp_path, capsys):
    missing = export_cli([tmp_path / "nope", tmp_path / "out"], tmp_path)  # the real CLI: exit status 2
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr

    from dense_model.export.hf import main

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_text("not ours")
    assert main([str(foreign), str(tmp_path / "out")]) == 2
    assert "is not a dense_model checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
