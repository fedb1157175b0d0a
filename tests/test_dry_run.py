"""``--dry-run`` (``dense_model.launcher.main``, what ``run_pretrain.sh CONFIG --dry-run`` runs): the
seed's MoE run reports OLMoE-1B-7B's parameter counts without its tokenizer or data on the machine,
and the demo's dry run tokenises nothing."""

from pathlib import Path

from dense_model.launcher import main

REPO = Path(__file__).resolve().parents[1]

# OLMoE-1B-7B (the seed's OLMoE-1B-7B-0924_PolyNorm.yml): 16 layers, d_model 2048, 16 heads,
# 64 experts of width 1536 (PolyNorm, non-gated) or 1024 (SwiGLU), top-8, vocabulary 50280 padded to
# its embedding_size 50304, untied input and output embeddings, QK-norm over the full q and k width.
LAYERS, D, EXPERTS, TOPK, VOCAB = 16, 2048, 64, 8, 50304


def olmoe_counts(expert_matrices: int, width: int, scalars_per_layer: int) -> tuple[int, int]:
    """(total, active) counted from the shape alone; the activation's scalars once per layer, shared
    by its experts (model.moe.activation_params: shared, the seed's)."""
    attention = 4 * D * D  # q, k, v, o: 16 heads x 128 = 2048
    norms = 2 * D + 2 * D + scalars_per_layer  # two RMSNorm gains, QK-norm's q and k gains, PolyNorm's a_i
    expert = expert_matrices * D * width
    router = EXPERTS * D
    embeddings = 2 * VOCAB * D + D  # input, output, final norm
    total = LAYERS * (attention + norms + router + EXPERTS * expert) + embeddings
    active = LAYERS * (attention + norms + router + TOPK * expert) + embeddings
    return total, active


def dry_run_layout(capsys, *args, code=0):
    got = main([*args, "--dry-run"])
    out, err = capsys.readouterr()
    assert got == code, err
    return out.strip().splitlines()[-1], err


def test_olmoe_dry_run_prints_the_papers_total_and_active_parameters(capsys):
    """6.9B total, 1.3B active (OLMoE-1B-7B's model card) with neither the dolma tokenizer file nor
    the data here: the vocabulary is the config's 50280 (padded to the seed's 50304); what keeps the
    job from launching is one line on stderr after the report, and the exit is 2 (a go/no-go check
    must not pass without the data)."""
    assert not (REPO / "data/tokenizer/allenai_gpt-neox-olmo-dolma-v1_5.json").exists()
    for activation, matrices, width, scalars in (("polynorm", 2, 1536, 4), ("swiglu", 3, 1024, 0)):
        layout, err = dry_run_layout(capsys, str(REPO / f"configs/moe/olmoe_1b7b_{activation}.yaml"), code=2)
        total, active = olmoe_counts(matrices, width, scalars)
        assert f"| {total:,} parameters" in layout, (activation, layout)
        assert f"| {active:,} active per token | total 6.9B, active 1.3B |" in layout, (activation, layout)
        assert "| vocabulary 50,280 padded to 50,304 |" in layout
        assert "| 4,194,304 tokens per step |" in layout and "(2,500 warm-up)" in layout
        assert layout.endswith(
            "| lr 4e-05 -> 0.0004 over 10,485,760,000 tokens, cosine to 4e-05 at 5,000,000,000,000 tokens"
        ), layout
        (line,) = err.splitlines()
        assert line.startswith("not launchable here yet: data.blend:"), line
    assert olmoe_counts(2, 1536, 4)[0] == 6_919_161_920 and olmoe_counts(3, 1024, 0)[1] == 1_282_017_280


def test_demo_dry_run_tokenises_nothing(tmp_path, monkeypatch, capsys):
    """The demo's data is built on a launch's first use, never by a dry run (its split check waits
    for the data; the vocabulary is the demo tokenizer's known size)."""
    monkeypatch.setenv("DENSE_MODEL_CACHE", str(tmp_path / "cache"))
    layout, err = dry_run_layout(capsys, str(REPO / "configs/demo.yaml"))
    assert err == ""
    assert "| vocabulary 4,096 padded to 4,096" in layout
    assert not (tmp_path / "cache").exists()
