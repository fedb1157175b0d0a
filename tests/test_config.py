"""Config loading, overrides and every validation error, with the field named in the message."""

import pytest

from dense_model.config import ConfigError, ffn_hidden_size, load_config, validate


def tiny(*overrides):
    return load_config(
        None,
        [
            "model.num_layers=4",
            "model.hidden_size=64",
            "model.num_attention_heads=4",
            "data.demo=true",
            *overrides,
        ],
    )


def test_yaml_base_chain_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "model:\n  hidden_size: 128\n  activation: swiglu\ntraining:\n  lr: 3.0e-4\n"
    )
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel:\n  activation: polynorm\n")
    cfg = load_config(tmp_path / "child.yaml", ["training.lr=1e-3", "model.activation_kwargs={order: 2}"])
    assert cfg.model.hidden_size == 128 and cfg.model.activation == "polynorm"
    assert cfg.training.lr == pytest.approx(1e-3) and cfg.model.activation_kwargs == {"order": 2}


def test_parameter_matched_ffn_width():
    assert ffn_hidden_size(tiny("model.activation=swiglu").model) == 5504
    assert ffn_hidden_size(tiny("model.activation=polynorm").model) == 8256
    assert ffn_hidden_size(tiny("model.activation=gelu", "model.ffn_hidden_size=100").model) == 100


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.hiden_size=3"], r"unknown config key 'model.hiden_size'; valid keys here: num_layers"),
        (["trainer.lr=3"], r"unknown config key 'trainer'"),
        (
            ["model.activation=swishy"],
            r"model.activation: unknown activation 'swishy'; known activations: .*polynorm",
        ),
        (
            ["model.num_attention_heads=5"],
            r"model.hidden_size=64 is not divisible by model.num_attention_heads=5",
        ),
        (
            ["parallel.tensor_model_parallel_size=8"],
            r"num_attention_heads=4 is not divisible by parallel.tensor_model_parallel_size=8",
        ),
        (
            ["model.activation=gelu", "model.ffn_hidden_size=101", "parallel.tensor_model_parallel_size=2"],
            r"FFN width 101 .* not divisible by parallel.tensor_model_parallel_size=2; set model.ffn_hidden_size to a multiple of 2",
        ),
        (
            ["parallel.pipeline_model_parallel_size=3"],
            r"model.num_layers=4 is not divisible by parallel.pipeline_model_parallel_size=3",
        ),
        (["model.num_layers=four"], r"model.num_layers: expected an integer, got 'four'"),
        (["training.bf16=maybe"], r"training.bf16: expected true or false, got 'maybe'"),
        (["training.lr=fast"], r"training.lr: expected a number"),
        (
            ["training.manual_gc_interval=-1"],
            r"training.manual_gc_interval must be a finite number >= 0 .*, got -1",
        ),
        (
            ["training.manual_gc=false", "training.manual_gc_interval=100"],
            r"training.manual_gc_interval=100 has no effect with training.manual_gc=false; set "
            r"training.manual_gc=auto",
        ),
        (["training.manual_gc=sometimes"], r"training.manual_gc: expected true or false, got 'sometimes'"),
        (["training.recompute_granularity=some"], r"training.recompute_granularity: 'some' is not one of"),
        (["model.activation_kwargs={order: 0}"], r"model.activation_kwargs: polynorm rejects"),
        (["model=3"], r"model: expected a section"),
        (["model.activation"], r"not key=value"),
    ],
)
def test_config_errors_name_the_field_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg = (
            tiny("model.activation=polynorm", *overrides)
            if "model.activation=" not in " ".join(overrides)
            else tiny(*overrides)
        )
        validate(cfg)


def test_world_size_checks():
    cfg = tiny("parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2")
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by .* = 2 x 2 = 4"):
        validate(cfg, world_size=6)
    cfg = tiny("training.micro_batch_size=2", "training.global_batch_size=6")
    with pytest.raises(
        ConfigError, match=r"global_batch_size=6 is not divisible by .* 2 x 2; use a multiple of 4"
    ):
        validate(cfg, world_size=2)
    validate(tiny(), world_size=32)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


# --------------------------------------------------------------------------------------------
# Every field checked before launch: `python -m dense_model.launcher` (what run_pretrain.sh runs
# before torchrun) exits 2 with one line naming the field or file and the fix.


@pytest.fixture
def data_files(tmp_path, spm_model):
    """A real (tiny) mmap dataset, a blend file over it and a tokenizer: a config that passes."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from dense_model.data.blend import write_blend

    prefix = str(tmp_path / "tiny_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(600):  # enough documents that the default split (969,30,1) leaves no part empty
        builder.add_document(np.arange(1, 50, dtype=np.uint16), [49])
    builder.finalize(prefix + ".idx")
    blend = tmp_path / "blend.json"
    write_blend(
        str(blend), [{"subset": "tiny", "prefix": prefix, "documents": 600, "tokens": 600 * 49}], "tokens"
    )
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "broken.model").write_text("not a sentencepiece model")
    return {"prefix": prefix, "blend": str(blend), "tokenizer": spm_model, "dir": tmp_path}


def base_overrides(files):
    return [
        "model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.activation=polynorm", "model.vocab_size=512", "model.seq_length=64",
        "training.train_iters=20", "training.lr_warmup_iters=2",
        "training.micro_batch_size=2", "training.global_batch_size=8",
        f"data.paths=[{files['prefix']}]", f"data.tokenizer_model={files['tokenizer']}",
    ]  # fmt: skip


BAD_VALUES = [
    # (override, text the one-line message must hold: the field and the fix)
    ("model.activation=polynrom", "model.activation: unknown activation 'polynrom'; known activations"),
    ("model.hidden_dropout=1.5", "model.hidden_dropout must be in [0, 1), got 1.5"),
    ("model.attention_dropout=-0.1", "model.attention_dropout must be in [0, 1)"),
    ("model.num_layers=0", "model.num_layers must be a finite number > 0"),
    ("model.hidden_size=-64", "model.hidden_size must be a finite number > 0"),
    ("model.seq_length=0", "model.seq_length must be a finite number > 0"),
    ("model.vocab_size=0", "model.vocab_size must be a finite number > 0"),
    ("model.vocab_size=500", "model.vocab_size=500 is below the 512 tokens of the tokenizer "),
    ("model.num_query_groups=3", "model.num_attention_heads=4 is not divisible by model.num_query_groups=3"),
    ("model.norm_epsilon=0", "model.norm_epsilon must be a finite number > 0"),
    ("model.init_method_std=.nan", "model.init_method_std must be a finite number > 0, got nan"),
    ("model.rotary_base=0", "model.rotary_base must be a finite number > 0"),
    ("model.ffn_hidden_size=0", "model.ffn_hidden_size must be a finite number > 0"),
    ("parallel.tensor_model_parallel_size=0", "parallel.tensor_model_parallel_size must be a finite number > 0"),
    ("parallel.sequence_parallel=true", "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1"),
    ("training.lr=nan", "training.lr must be a finite number > 0, got nan"),
    ("training.lr=.inf", "training.lr must be a finite number > 0, got inf"),
    ("training.lr=0", "training.lr must be a finite number > 0"),
    ("training.min_lr=-1e-5", "training.min_lr must be a finite number >= 0"),
    ("training.min_lr=1.0", "training.min_lr=1.0 is above training.lr"),
    ("training.adam_beta1=1.0", "training.adam_beta1 must be in [0, 1)"),
    ("training.adam_beta2=1.5", "training.adam_beta2 must be in [0, 1), got 1.5"),
    ("training.adam_eps=0", "training.adam_eps must be a finite number > 0"),
    ("training.weight_decay=-0.1", "training.weight_decay must be a finite number >= 0"),
    ("training.clip_grad=-1", "training.clip_grad must be a finite number >= 0 (0 disables), got -1"),
    ("training.train_iters=0", "training.train_iters must be a finite number > 0"),
    ("training.train_iters=2", "warm-up (2 steps, training.lr_warmup_iters or training.lr_warmup_tokens) is not shorter than training (2 steps)"),
    ("training.micro_batch_size=0", "training.micro_batch_size must be a finite number > 0"),
    ("training.global_batch_size=12", "training.global_batch_size=12 is not divisible by training.micro_batch_size x data-parallel size = 2 x 4"),
    ("training.lr_warmup_iters=-1", "training.lr_warmup_iters must be a finite number >= 0"),
    ("training.recompute_num_layers=0", "training.recompute_num_layers must be a finite number > 0"),
    ("training.peak_flops=-1", "training.peak_flops must be a finite number > 0"),
    ("data.split=a,b,c", "data.split='a,b,c' is not a list of numbers; write it as train,valid,test parts"),
    ("data.split=1,2,3,4", "data.split='1,2,3,4': at most 3 finite parts >= 0 with a positive sum"),
    ("data.split=0,0,0", "data.split='0,0,0': at most 3 finite parts >= 0 with a positive sum"),
    ("data.num_workers=-1", "data.num_workers must be a finite number >= 0"),
    ("data.weights=[1.0, 2.0]", "data.weights has 2 entries but data.paths has 1; give one weight per path"),
    ("data.weights=[-1.0]", "data.weights[0]=-1.0: weights must be finite and >= 0"),
    ("checkpoint.save_interval=0", "checkpoint.save_interval must be a finite number > 0"),
    ("checkpoint.keep_last=-2", "checkpoint.keep_last must be a finite number > 0"),
    ("logging.log_interval=-1", "logging.log_interval must be a finite number > 0, got -1"),
    ("logging.log_interval=0", "logging.log_interval must be a finite number > 0"),
    ("logging.eval_interval=-5", "logging.eval_interval must be a finite number >= 0"),
    ("logging.eval_iters=-1", "logging.eval_iters must be a finite number >= 0"),
]  # fmt: skip

BAD_FILES = [
    ("data.paths=[{dir}/missing_text_document]", "data.paths[0]: {dir}/missing_text_document.bin does not exist; give the prefix"),
    ("data.blend={dir}/missing.json", "data.blend: "),
    ("data.blend={dir}/broken.json", "data.blend: "),
    ("data.tokenizer_model={dir}/missing.model", "data.tokenizer_model: cannot load {dir}/missing.model as a sentencepiece tokenizer"),
    ("data.tokenizer_model={dir}/broken.model", "data.tokenizer_model: cannot load {dir}/broken.model as a sentencepiece tokenizer"),
    ("data.tokenizer_model=", "data.tokenizer_model is not set"),
    ("checkpoint.load={dir}/no_such_run", "checkpoint.load={dir}/no_such_run does not exist; give a run directory"),
]  # fmt: skip


def check_cli(capsys, args, expect):
    from dense_model.launcher import main

    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("config error: ") and expect in err, err


def test_good_config_passes(capsys, data_files):
    from dense_model.launcher import main

    assert main([*base_overrides(data_files), "--world-size", "1"]) == 0
    blend = [o for o in base_overrides(data_files) if not o.startswith("data.paths")]
    assert main([*blend, f"data.blend={data_files['blend']}"]) == 0


@pytest.mark.parametrize("override, expect", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_value_exits_2_with_one_line(capsys, data_files, override, expect):
    check_cli(capsys, [*base_overrides(data_files), override, "--world-size", "4"], expect)


@pytest.mark.parametrize("override, expect", BAD_FILES, ids=[b[0].split("=")[0] for b in BAD_FILES])
def test_missing_or_broken_file_exits_2_with_one_line(capsys, data_files, override, expect):
    d = str(data_files["dir"])
    overrides = [o for o in base_overrides(data_files) if not o.startswith(override.split("=")[0])]
    if override.startswith("data.blend"):
        overrides = [o for o in overrides if not o.startswith("data.paths")]
    check_cli(capsys, [*overrides, override.format(dir=d)], expect.format(dir=d))


def test_every_section_validates_its_own_fields():
    """Each section of Config has a validate() of its own (a new section must bring one)."""
    from dense_model.config import Config, sections

    assert [name for name, s in sections(Config()) if callable(getattr(s, "validate", None))] == [
        name for name, _ in sections(Config())
    ]


def test_vocabulary_is_the_tokenizers_unless_set(data_files):
    """model.vocab_size unset: the tokenizer's (the SentencePiece model's 512, or the demo's 4096),
    padded to the multiple x TP; set: at least the tokenizer's. A model is not built from an
    unresolved config."""
    import sentencepiece

    from dense_model.config import padded_vocab_size, resolve_vocab_size

    overrides = [o for o in base_overrides(data_files) if not o.startswith("model.vocab_size")]
    cfg = load_config(None, [*overrides, "model.make_vocab_size_divisible_by=100"])
    assert cfg.model.vocab_size is None
    validate(cfg, world_size=4)
    tokens = sentencepiece.SentencePieceProcessor(model_file=data_files["tokenizer"]).vocab_size()
    assert resolve_vocab_size(cfg) == tokens == 512
    with pytest.raises(ConfigError, match=r"model.vocab_size is not resolved: .* set model.vocab_size=N"):
        padded_vocab_size(cfg.model, 1)
    cfg.model.vocab_size = resolve_vocab_size(cfg)
    assert padded_vocab_size(cfg.model, 2) == 600  # multiple of 100 x TP 2
    assert resolve_vocab_size(load_config(None, [*overrides, "model.vocab_size=1000"])) == 1000
    assert resolve_vocab_size(tiny()) == 4096  # the demo's tokenizer
    with pytest.raises(ConfigError, match=r"model.vocab_size=4000 is below the 4096 tokens of the demo's"):
        validate(tiny("model.vocab_size=4000"))
