"""Hugging Face import: a tiny random ``LlamaForCausalLM`` built here from a config (GQA, untied and
tied embeddings, non-default rope_theta; sharded safetensors with an index, pytorch_model.bin
shards) imports into a run directory whose model gives transformers' logits; the run directory is
what training and evaluation read; unsupported configs and bad folders stop with one line, exit 2,
nothing written.

Megatron runs only in spawned processes and in the CLI's own process; transformers runs here.
"""

import json
from pathlib import Path

import pytest
import torch

from dense_model.testing import run_tool, spawn_workers

REPO = Path(__file__).resolve().parents[2]
IMPORT_CLI = REPO / "toolkits" / "checkpoint_conversion" / "import_hf.py"
VOCAB, SEQ = 512, 64
# name -> LlamaConfig fields beyond the common ones below (gqa_untied is saved in shards with an
# index, tied as one model.safetensors)
SHARD_SIZE = {"gqa_untied": "40KB", "tied": "1GB"}
MODELS = {
    "gqa_untied": dict(
        num_key_value_heads=2, tie_word_embeddings=False, rope_theta=50000.0, rms_norm_eps=1e-5
    ),
    "tied": dict(num_key_value_heads=4, tie_word_embeddings=True, rope_theta=20000.0, rms_norm_eps=1e-6),
}
BIN = "gqa_untied_bin"  # gqa_untied's weights as pytorch_model-*.bin shards + index


def llama_config(**fields):
    from transformers import LlamaConfig

    theta = fields.pop("rope_theta")
    return LlamaConfig(
        vocab_size=fields.pop("vocab_size", VOCAB),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=SEQ,
        initializer_range=0.1,  # O(1) logits, so a misplaced weight shows
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        **fields,
    )


def make_hf_model(folder: Path, tokenizer: str, max_shard_size: str, seed: int = 0, **fields):
    """A random LlamaForCausalLM saved in ``folder`` (sharded safetensors + index) with the
    SentencePiece model exported as tokenizer.json; norms moved off their init (ones)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return save_hf_model(LlamaForCausalLM(llama_config(**fields)), folder, tokenizer, max_shard_size)


def save_hf_model(model, folder: Path, tokenizer: str, max_shard_size: str):
    """``model`` with its norms moved off their init (ones), saved in ``folder`` with the
    SentencePiece model as tokenizer.json."""
    from dense_model.export.tokenizer import export_tokenizer

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn(param.shape))
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    export_tokenizer("sentencepiece", tokenizer, folder, model_max_length=SEQ)
    return model.eval()


def save_as_bin(model, folder: Path, like: Path) -> None:
    """``model``'s weights as two pytorch_model-*.bin shards with their index, config and tokenizer
    copied from ``like``."""
    import shutil

    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(like / name, folder / name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        filename = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({n: state[n] for n in part}, folder / filename)
        weight_map.update(dict.fromkeys(part, filename))
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def _import_job(rank, world_size, out_dir, names, tokens_file):
    """Import every HF folder and record our model's logits on the tokens."""
    from dense_model.checkpoint.inference import load_model_for_inference
    from dense_model.export.hf_import import import_hf

    tokens = torch.load(tokens_file)  # [b, s]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = {}
    for name in names:
        import_hf(Path(out_dir) / "hf" / name, Path(out_dir) / "runs" / name)
        loaded = load_model_for_inference(Path(out_dir) / "runs" / name)
        with torch.no_grad():
            logits[name] = loaded.model(tokens, positions, None).clone()  # [b, s, padded vocab]
    torch.save(logits, Path(out_dir) / "logits.pt")


@pytest.fixture(scope="module")
def imported(tmp_path_factory, spm_model):
    out = tmp_path_factory.mktemp("import")
    hf_logits = {}
    tokens = torch.randint(0, VOCAB, (3, SEQ))  # fresh random tokens each run
    torch.save(tokens, out / "tokens.pt")
    for name, fields in MODELS.items():
        model = make_hf_model(out / "hf" / name, spm_model, max_shard_size=SHARD_SIZE[name], **fields)
        with torch.no_grad():
            hf_logits[name] = model(tokens).logits  # [b, s, vocab]
        if name == "gqa_untied":
            save_as_bin(model, out / "hf" / BIN, out / "hf" / name)
            hf_logits[BIN] = hf_logits[name]
    assert len(list((out / "hf" / "gqa_untied").glob("model-*.safetensors"))) > 1  # sharded, with index
    assert (out / "hf" / "tied" / "model.safetensors").is_file()
    spawn_workers(_import_job, 1, str(out), list(hf_logits), str(out / "tokens.pt"))
    return out, hf_logits, torch.load(out / "logits.pt")


@pytest.mark.parametrize("name", [*MODELS, BIN])
def test_imported_model_gives_transformers_logits(imported, name):
    _, hf_logits, ours = imported
    theirs = hf_logits[name]
    assert theirs.abs().max() > 1.0  # logits far from uniform: the comparison means something
    assert ours[name].shape[-1] % 128 == 0  # padded to our multiple (here no padding: 512)
    diff = (ours[name][..., :VOCAB] - theirs).abs().max() / theirs.abs().max()
    assert diff < 1e-5, f"{name}: max |ours - HF| / max |HF| = {diff:.3g}"


def test_run_directory_is_a_weights_only_checkpoint(imported):
    from dense_model.checkpoint import read_latest_iteration, read_metadata, resolve_checkpoint
    from dense_model.config import config_to_dict, load_config

    out, _, _ = imported
    run = out / "runs" / "tied"
    assert read_latest_iteration(run / "checkpoints") == 0
    meta = read_metadata(resolve_checkpoint(run))
    assert meta["iteration"] == 0 and meta["weights_only"] is True
    cfg = load_config(run / "config.yaml")
    assert cfg.run_dir == str(run) and cfg.checkpoint.load == str(run)
    assert (cfg.data.tokenizer_type, cfg.data.tokenizer_model) == ("huggingface", str(run / "tokenizer"))
    m = cfg.model
    assert (m.num_query_groups, m.untie_embeddings, m.rotary_base, m.norm_epsilon) == (
        None,
        False,
        20000,
        1e-6,
    )
    assert (m.activation, m.ffn_hidden_size, m.seq_length, m.vocab_size) == ("swiglu", 96, SEQ, VOCAB)
    assert meta["config"] == config_to_dict(cfg)  # the final paths, not the staging folder's
    gqa = load_config(out / "runs" / "gqa_untied" / "config.yaml").model
    assert (gqa.num_query_groups, gqa.untie_embeddings, gqa.rotary_base) == (2, True, 50000)
    assert not list((out / "runs").glob(".*"))  # no staging folder left behind


def import_cli(args, tmp):
    return run_tool(IMPORT_CLI, args, tmp)


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def copy_hf(imported, tmp_path, name="gqa_untied") -> Path:
    import shutil

    out, _, _ = imported
    return Path(shutil.copytree(out / "hf" / name, tmp_path / name))


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 50000.0}  # fmt: skip


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rope_parameters": LLAMA3_ROPE}, "rope_scaling"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"mlp_bias": True}, "mlp_bias=True"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"head_dim": 32}, "head_dim=32"),
        ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, "q_proj/k_proj/v_proj"),
        (
            {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 32},
            "sliding_window=32",
        ),
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "is none of LlamaForCausalLM"),
        ({"vocab_size": 500}, "the tokenizer has 512 tokens but config.json's vocab_size is 500"),
    ],
)
def test_unsupported_config_is_refused(imported, tmp_path, capsys, changes, message):
    from dense_model.export.hf_import import main

    folder = copy_hf(imported, tmp_path)
    _edit_config(folder, **changes)
    assert main([str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # nothing half-written


def test_mistral_without_window_imports_as_llama(imported, tmp_path, capsys):
    from dense_model.export.hf_import import plan_import

    folder = copy_hf(imported, tmp_path)
    _edit_config(folder, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
    plan = plan_import(folder, tmp_path / "out")
    assert plan.arch == "MistralForCausalLM" and not plan.missing and not plan.unmatched
    assert plan.cfg.model.num_query_groups == 2 and plan.cfg.model.rotary_base == 50000


def test_bad_folders_are_refused(imported, tmp_path, capsys):
    from dense_model.export.hf_import import main

    def refused(folder, out, text, *flags):
        assert main([str(folder), str(out), *flags]) == 2
        err = capsys.readouterr().err
        assert text in err and err.count("\n") == 1, err

    refused(tmp_path / "nope", tmp_path / "out", "is not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(empty, tmp_path / "out", "config.json does not exist")
    folder = copy_hf(imported, tmp_path)
    for weights in folder.glob("model*"):
        weights.unlink()
    refused(folder, tmp_path / "out", "holds no weights")
    folder = copy_hf(imported, tmp_path, "tied")
    (folder / "tokenizer.json").unlink()
    refused(folder, tmp_path / "out", "has no tokenizer")
    assert not (tmp_path / "out").exists()
    # a non-empty output folder is kept unless --overwrite
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(
        copy_hf(imported, tmp_path / "again"), out, "exists and is not empty; remove it or pass --overwrite"
    )
    assert (out / "notes.txt").read_text() == "mine"
    refused(folder, folder.parent, f"contains HF_DIR {folder}", "--overwrite")


def test_cli_dry_run_lists_unmatched_tensors_and_overwrite_replaces(imported, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_hf(imported, tmp_path, "tied")
    good = import_cli([folder, tmp_path / "out", "--dry-run"], tmp_path)
    assert good.returncode == 0, good.stderr[-3000:]
    assert (
        "decoder.layers.1.self_attention.linear_qkv.weight <- model.layers.1.self_attn.q_proj.weight, "
        in good.stdout
    )
    assert "rotary_base: 20000" in good.stdout and not (tmp_path / "out").exists()
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    bad = import_cli([folder, tmp_path / "out", "--dry-run"], tmp_path)
    assert bad.returncode == 2
    assert "UNMATCHED (no parameter of ours): model.layers.0.mlp.extra_proj.weight" in bad.stdout
    # the import itself refuses it, before writing anything
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "old.txt").write_text("old")
    refused = import_cli([folder, busy, "--overwrite"], tmp_path)
    assert refused.returncode == 2 and "unmatched ['model.layers.0.mlp.extra_proj.weight']" in refused.stderr
    assert (busy / "old.txt").is_file()
    del weights["model.layers.0.mlp.extra_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    done = import_cli([folder, busy, "--overwrite"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        not (busy / "old.txt").exists()
        and (busy / "checkpoints" / "latest_checkpointed_iteration.txt").is_file()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "tied"]


# --------------------------------------------------------------------------------------------
# One pytorch_model.bin (no index), as older checkpoints ship it; a tied model's state dict
# holds lm_head.weight too. 520 tokens in config.json: our embedding is padded to 640 rows.
PADDED_VOCAB = 520
SINGLE_BIN = {
    "bin_tied": dict(MODELS["tied"], vocab_size=PADDED_VOCAB),
    "bin_untied": dict(MODELS["gqa_untied"], vocab_size=PADDED_VOCAB),
}


def _single_bin_job(rank, world_size, out_dir, tokens_file):
    """Import each single-.bin folder; our logits and the padding rows of the embedding and output."""
    from dense_model.checkpoint.inference import load_model_for_inference
    from dense_model.export.hf_import import import_hf

    tokens = torch.load(tokens_file)  # [b, s]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    found = {}
    for name in SINGLE_BIN:
        run = import_hf(Path(out_dir) / "hf" / name, Path(out_dir) / "runs" / name)
        model = load_model_for_inference(run).model
        with torch.no_grad():
            logits = model(tokens, positions, None).clone()  # [b, s, padded vocab]
        rows = [model.embedding.word_embeddings.weight[PADDED_VOCAB:]]  # [padded - vocab, hidden]
        if model.output_layer.weight is not None:
            rows.append(model.output_layer.weight[PADDED_VOCAB:])
        found[name] = (logits, [r.detach().clone() for r in rows])
    torch.save(found, Path(out_dir) / "found.pt")


@pytest.fixture(scope="module")
def single_bin(tmp_path_factory, spm_model):
    out = tmp_path_factory.mktemp("single_bin")
    tokens = torch.randint(0, VOCAB, (2, SEQ))  # [b, s], fresh random tokens each run
    torch.save(tokens, out / "tokens.pt")
    hf_logits = {}
    for name, fields in SINGLE_BIN.items():
        folder = out / "hf" / name
        model = make_hf_model(folder, spm_model, max_shard_size="1GB", **fields)
        for weights in folder.glob("model*.safetensors*"):
            weights.unlink()
        state = model.state_dict()
        assert "lm_head.weight" in state  # tied too: what .bin state dicts hold
        torch.save({k: v.clone() for k, v in state.items()}, folder / "pytorch_model.bin")
        with torch.no_grad():
            hf_logits[name] = model(tokens).logits  # [b, s, vocab]
    spawn_workers(_single_bin_job, 1, str(out), str(out / "tokens.pt"))
    return hf_logits, torch.load(out / "found.pt")


@pytest.mark.parametrize("name", SINGLE_BIN)
def test_a_single_pytorch_model_bin_imports_with_transformers_logits_and_zero_padding(single_bin, name):
    hf_logits, found = single_bin
    theirs, (ours, padding) = hf_logits[name], found[name]
    assert ours.shape[-1] == 640 and theirs.shape[-1] == PADDED_VOCAB
    diff = (ours[..., :PADDED_VOCAB] - theirs).abs().max() / theirs.abs().max()
    assert theirs.abs().max() > 1.0 and diff < 1e-5, f"{name}: max |ours - HF| / max |HF| = {diff:.3g}"
    assert len(padding) == (2 if name == "bin_untied" else 1)
    for rows in padding:  # the padded vocabulary's rows: zeros, never looked up, cut at export
        assert rows.shape[0] == 640 - PADDED_VOCAB and torch.count_nonzero(rows) == 0


# --------------------------------------------------------------------------------------------
# What --overwrite may replace


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_replaces_an_untrained_import_never_a_run_that_trained(imported, tmp_path):
    import shutil

    out, _, _ = imported
    hf = copy_hf(imported, tmp_path, "tied")
    runs = tmp_path / "runs"
    earlier = Path(shutil.copytree(out / "runs" / "tied", runs / "x"))
    assert (earlier / "imported_from.json").is_file()
    done = import_cli([hf, earlier, "--overwrite"], tmp_path)  # an import nobody trained in
    assert done.returncode == 0, done.stderr[-3000:]
    assert (earlier / "imported_from.json").is_file()

    # then a job trained in it: metrics, a checkpoint past the import's, its lock
    (earlier / "metrics.jsonl").write_text('{"step": 10, "loss": 4.0}\n')
    (earlier / "job.lock").write_text('{"host": "h", "pid": 1}')
    shutil.copytree(earlier / "checkpoints" / "iter_0000000", earlier / "checkpoints" / "iter_0000010")
    (earlier / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("10")
    before = _snapshot(runs)
    for target in (earlier, runs, tmp_path / "runs" / "." / "x" / ""):
        result = import_cli([hf, target, "--overwrite"], tmp_path)
        assert result.returncode == 2, result.stderr[-3000:]
        (line,) = [x for x in result.stderr.splitlines() if "error" in x]
        assert "so it is not an earlier import nobody trained in: nothing was deleted" in line, line
    # the tracker alone moved on (no metrics yet): still a run that trained
    (earlier / "metrics.jsonl").unlink()
    (earlier / "job.lock").unlink()
    result = import_cli([hf, earlier, "--overwrite"], tmp_path)
    assert result.returncode == 2 and "holds a checkpoint tracker" in result.stderr, result.stderr[-3000:]
    assert {k: v for k, v in _snapshot(runs).items() if "metrics" not in k and "job.lock" not in k} == {
        k: v for k, v in before.items() if "metrics" not in k and "job.lock" not in k
    }


def test_relative_hf_dir_inside_out_is_refused_with_the_model_kept(imported, tmp_path, monkeypatch, capsys):
    from dense_model.export.hf_import import main

    hf = copy_hf(imported, tmp_path / "out", "tied")
    before = _snapshot(hf)
    monkeypatch.chdir(tmp_path)
    for out in ("out", "out/", "out/tied/..", "out/tied", "./out/tied/."):
        assert main(["out/tied", out, "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "HF_DIR out/tied; writing there could delete it" in err and err.count("\n") == 1, err
    assert _snapshot(hf) == before
