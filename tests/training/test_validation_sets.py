"""Named held-out validation sets (data.validation_sets): what the check before launch refuses (the
launcher's check, in process), and, on the trainer's gloo ranks, that each set's logged loss is a
separate forward of the saved model over the same samples (read through megatron-core's GPTDataset
here), that DP=2 logs the same values, that the sets change no training loss, and that
checkpoint.keep_every keeps the scored steps' checkpoints."""

import json

import numpy as np
import pytest

from dense_model.launcher import main as launcher_main
from tests.training.pretrain_jobs import read_metrics, trained_ok

SEQ, GLOBAL_BATCH, EVAL_ITERS = 64, 8, 2  # tests/training/conftest.py's tiny run
# Four steps; validation, and a checkpoint kept by keep_every, at steps 2 and 4; 1 and 3 pruned.
SHORT = [
    "training.train_iters=4",
    "logging.eval_interval=2",
    "checkpoint.save_interval=1",
    "checkpoint.keep_last=1",
    "checkpoint.keep_every=2",
]


def _write_set(prefix, documents, dtype=np.uint16):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for ids in documents:
        builder.add_document(np.array(ids, dtype=dtype), [len(ids)])
    builder.finalize(prefix + ".idx")
    return prefix


def _documents(spm_model, paragraphs, max_tokens):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=spm_model)
    docs, total = [], 0
    for paragraph in paragraphs:
        ids = sp.encode(paragraph) + [sp.eos_id()]
        docs.append(ids)
        total += len(ids)
        if total >= max_tokens:
            break
    return docs


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, spm_model):
    """{name: prefix}: 'docs' (text the training set also has, reversed paragraph order: several
    batches, EVAL_ITERS scored) and 'short' (between one and two global batches: one scored)."""
    from dense_model.testing import python_docs_text

    folder = tmp_path_factory.mktemp("held_out")
    text = python_docs_text()
    return {
        "docs": _write_set(str(folder / "docs_text_document"), _documents(spm_model, text[::-1], 6000)),
        "short": _write_set(
            str(folder / "short_text_document"), _documents(spm_model, text[::5], 1.5 * 8 * 64)
        ),
    }


def _sets_override(sets):
    return "data.validation_sets={" + ", ".join(f"{k}: {v}" for k, v in sets.items()) + "}"


def test_a_bad_set_is_one_line_before_launch_and_nothing_is_written(tiny_config, held_out, tmp_path, capsys):
    tiny = _write_set(str(tmp_path / "tiny_text_document"), [list(range(5, 300))])  # < 8 x 64 tokens
    alien = _write_set(str(tmp_path / "alien_text_document"), [list(range(400, 1100))] * 2, np.int32)
    cases = [
        ({"c4": str(tmp_path / "missing_text_document")}, "data.validation_sets.c4: ", "does not exist"),
        (
            {"wiki": tiny},
            "data.validation_sets.wiki: 4 samples of 64 tokens, fewer than one global batch",
            "",
        ),
        (
            {"other": alien},
            "data.validation_sets.other: ",
            "holds token id 1099, outside the tokenizer's vocabulary of 512",
        ),
        ({"a/b": held_out["docs"]}, "data.validation_sets: name 'a/b' is not usable", ""),
    ]
    for sets, starts, contains in cases:
        config, run_dir = tiny_config("bad", _sets_override(sets))
        assert launcher_main([str(config), "--world-size", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"config error: {starts}") and contains in err, err
        assert err.count("\n") == 1, err
        assert not run_dir.exists()


def test_the_token_scan_runs_once_before_launch_not_at_every_config_load(tiny_config, tmp_path, capsys):
    """A set tokenised with another tokenizer passes validate() (run by every rank at every config
    load: no .bin scanned there) and is refused by the launcher's data check, one line, exit 2."""
    from dense_model.config import load_config, validate

    alien = _write_set(str(tmp_path / "alien_text_document"), [list(range(400, 1100))] * 2, np.int32)
    config, run_dir = tiny_config("alien", _sets_override({"other": alien}))
    validate(load_config(str(config), []), world_size=1)
    assert launcher_main([str(config), "--world-size", "1"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"config error: data.validation_sets.other: {alien} holds token id 1099, outside the tokenizer's "
        "vocabulary of 512: it was tokenised with another tokenizer; re-tokenise it with data.tokenizer_model\n"
    )
    assert not run_dir.exists()


def _reference_losses(rank, world_size, jobs, spm_model, seed, out_file):
    """Independent losses, {key: loss} for jobs [(key, checkpoint folder, set prefix, samples)]: the
    checkpoint's model (load_model_for_inference) over the first ``samples`` samples of the set,
    read through megatron-core's own GPTDataset (split 1,0,0, the run's seed, its own index cache),
    summed over tokens and divided by their count."""
    import tempfile

    import torch
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from dense_model.checkpoint.inference import load_model_for_inference
    from dense_model.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer("sentencepiece", spm_model)
    results = {}
    with tempfile.TemporaryDirectory() as cache, torch.no_grad():
        for key, folder, prefix, samples in jobs:
            model = load_model_for_inference(folder).model
            config = GPTDatasetConfig(
                random_seed=seed,
                sequence_length=SEQ,
                blend=([prefix], None),
                split="1,0,0",
                path_to_cache=cache,
                tokenizer=tokenizer,
                reset_position_ids=False,
                reset_attention_mask=False,
                eod_mask_loss=False,
                mmap_bin_files=True,
            )
            builder = BlendedMegatronDatasetBuilder(GPTDataset, [samples, 0, 0], lambda: True, config)
            dataset, _, _ = builder.build()
            total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
            for i in range(samples):
                s = dataset[i]
                losses = model(s["tokens"][None], s["position_ids"][None], None, labels=s["labels"][None])
                mask = s["loss_mask"][None].double()  # [1, SEQ], as losses
                total += (losses.double() * mask).sum()
                count += mask.sum()
            results[key] = float(total / count)
    torch.save(results, out_file)


def _references(jobs, spm_model, tmp_path):
    """_reference_losses in one forked worker (one process group for all the checkpoints)."""
    import torch

    from dense_model.testing import spawn_workers

    out = tmp_path / "reference.pt"
    spawn_workers(_reference_losses, 1, jobs, spm_model, 1234, str(out))
    return torch.load(out)


def _set_records(run_dir):
    """{step: {valid/NAME/loss: ..., valid/NAME/ppl: ...}} from metrics.jsonl."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        values = {k: v for k, v in record.items() if k.startswith("valid/")}
        if values:
            out[record["step"]] = values
    return out


@pytest.mark.slow
def test_named_sets_are_a_separate_forward_the_same_at_dp2_and_change_no_training_loss(
    tiny_config, held_out, spm_model, tmp_path
):
    sets = _sets_override(held_out)
    config, run_dir = tiny_config("sets", sets, "training.seed=1234")
    out = trained_ok(config, *SHORT)
    assert "validation docs loss" in out and "validation short loss" in out, out
    logged = _set_records(run_dir)
    assert sorted(logged) == [2, 4]
    assert set(logged[4]) == {"valid/docs/loss", "valid/docs/ppl", "valid/short/loss", "valid/short/ppl"}
    # keep_every=2 with keep_last=1: the scored steps' checkpoints stay, 1 and 3 are pruned.
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*")) == [
        "iter_0000002",
        "iter_0000004",
    ]

    # The logged losses are a separate forward over the same samples: 'docs' EVAL_ITERS batches,
    # 'short' its one whole batch; at step 2 and at step 4 (the same samples each time).
    jobs = [
        (
            (step, name),
            str(run_dir / "checkpoints" / f"iter_{step:07d}"),
            held_out[name],
            batches * GLOBAL_BATCH,
        )
        for step in (2, 4)
        for name, batches in (("docs", EVAL_ITERS), ("short", 1))
    ]
    for (step, name), ref in _references(jobs, spm_model, tmp_path).items():
        assert logged[step][f"valid/{name}/loss"] == pytest.approx(ref, abs=1e-6), (step, name)
        assert logged[step][f"valid/{name}/ppl"] == pytest.approx(np.exp(ref), rel=1e-6)
    assert logged[2]["valid/docs/loss"] != logged[4]["valid/docs/loss"]

    # Without the named sets: the same training losses, bitwise, and the same blend validation.
    plain, plain_dir = tiny_config("plain", "training.seed=1234")
    trained_ok(plain, *SHORT)
    assert read_metrics(plain_dir) == read_metrics(run_dir)
    assert not _set_records(plain_dir)

    # DP=2: each rank scores half of every batch; the values are DP=1's.
    dp2, dp2_dir = tiny_config("sets_dp2", sets, "training.seed=1234")
    trained_ok(dp2, *SHORT, nproc=2)
    for step, values in _set_records(dp2_dir).items():
        for key, value in values.items():
            assert value == pytest.approx(logged[step][key], rel=1e-5), (step, key)
    assert sorted(_set_records(dp2_dir)) == [2, 4]
