"""dense_model.data.gpt_dataset: a blend file from preprocess loads in megatron-core's dataset builder,
without torch.distributed and inside a 2-process gloo group."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dense_model.data.blend import load_blend
from dense_model.data.gpt_dataset import build_gpt_datasets
from dense_model.data.preprocess import preprocess
from dense_model.data.tokenizers import build_tokenizer
from tests.data.helpers import preprocess_config

REPO = Path(__file__).resolve().parents[2]
SEQ = 32


@pytest.fixture(scope="module")
def blend_file(tmp_path_factory, spm_model, texts, data_helpers) -> str:
    root = tmp_path_factory.mktemp("blend")
    for i, subset in enumerate(("arxiv", "book", "github")):
        data_helpers.write_jsonl(
            str(root / "in" / subset / "part.jsonl"), [{"text": t} for t in texts[i * 60 : i * 60 + 60]]
        )
    prefix = root / "out" / "red"
    preprocess(preprocess_config(spm_model, prefix, [str(root / "in")], split_by_subset=True), log=None)
    return str(prefix) + "_blend.json"


def _build(blend_file, spm_model, cache_dir, **kw):
    tok = build_tokenizer("sentencepiece", spm_model)
    prefixes, weights = load_blend(blend_file)
    return build_gpt_datasets(
        prefixes,
        weights,
        tokenizer=tok,
        seq_length=SEQ,
        seed=1234,
        split="90,10,0",
        num_samples=(64, 8, 0),
        cache_dir=str(cache_dir),
        **kw,
    )


def test_blend_file_builds_without_a_process_group(tmp_path, blend_file, spm_model):
    assert not torch.distributed.is_initialized()
    train, valid, test = _build(blend_file, spm_model, tmp_path / "cache")
    assert len(train) >= 64 and len(valid) >= 8 and test is None
    sample = train[0]
    assert sample["tokens"].shape == (SEQ,) and sample["labels"].shape == (SEQ,)
    assert sample["loss_mask"].shape == (SEQ,) and sample["position_ids"].shape == (SEQ,)
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])  # labels are tokens shifted by one
    datasets = {int(train[i]["dataset_id"]) for i in range(len(train))}
    assert datasets == {0, 1, 2}  # every subset of the blend is drawn
    assert list((tmp_path / "cache").glob("*.npy")), "indexes are cached"
    again, _, _ = _build(blend_file, spm_model, tmp_path / "cache")  # cache hit
    assert torch.equal(again[5]["tokens"], train[5]["tokens"])


def test_eod_mask_loss(tmp_path, blend_file, spm_model):
    train, _, _ = _build(blend_file, spm_model, tmp_path / "cache", eod_mask_loss=True)
    for i in range(len(train)):
        s = train[i]
        eod = s["tokens"] == 2
        if eod.any():
            assert (s["loss_mask"][eod] == 0).all()
            return
    pytest.fail("no sample holds an EOD token")


def test_empty_split_is_an_error_not_a_hang(tmp_path, spm_model, data_helpers):
    data_helpers.write_jsonl(str(tmp_path / "one.jsonl"), [{"text": "a single short document"}])
    preprocess(preprocess_config(spm_model, tmp_path / "one", [str(tmp_path / "one.jsonl")]), log=None)
    with pytest.raises(ValueError, match="leaves its valid part empty"):
        build_gpt_datasets(
            [str(tmp_path / "one_text_document")],
            None,
            tokenizer=build_tokenizer("sentencepiece", spm_model),
            seq_length=8,
            seed=1,
            split="90,10,0",
            num_samples=(4, 1, 0),
            cache_dir=str(tmp_path / "c"),
        )


_RANKS = textwrap.dedent(
    """
    import json, sys, torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    def run(rank, blend, model, cache, store, out):
        dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
        from dense_model.data.blend import load_blend
        from dense_model.data.gpt_dataset import build_gpt_datasets
        from dense_model.data.tokenizers import build_tokenizer
        prefixes, weights = load_blend(blend)
        train, valid, _ = build_gpt_datasets(prefixes, weights, tokenizer=build_tokenizer("sentencepiece", model),
            seq_length=SEQ_LEN, seed=1234, split="90,10,0", num_samples=(64, 8, 0), cache_dir=cache)
        with open(out + str(rank), "w") as f:
            json.dump({"len": len(train), "tokens": train[3]["tokens"].tolist()}, f)
        dist.barrier()
        dist.destroy_process_group()

    if __name__ == "__main__":
        import megatron.core.datasets.gpt_dataset  # imported once, inherited by the forked ranks
        mp.start_processes(run, args=tuple(sys.argv[1:]), nprocs=2, start_method="fork")
    """
).replace("SEQ_LEN", str(SEQ))


@pytest.mark.slow
def test_blend_file_builds_inside_a_gloo_group(tmp_path, blend_file, spm_model):
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS)
    out = str(tmp_path / "rank")
    cmd = [
        sys.executable,
        str(script),
        blend_file,
        spm_model,
        str(tmp_path / "cache"),
        str(tmp_path / "store"),
        out,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(Path(out + str(r)).read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    train, _, _ = _build(blend_file, spm_model, tmp_path / "cache_single")
    assert ranks[0]["len"] == len(train) and ranks[0]["tokens"] == train[3]["tokens"].tolist()


_NODES = textwrap.dedent(
    """
    import json, os, sys
    import torch.distributed as dist
    import torch.multiprocessing as mp

    def run(rank, cache_dirs, store, out):
        os.environ["LOCAL_RANK"] = "0"  # two nodes of one rank each: each rank is its node's first
        dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
        from dense_model.data.gpt_dataset import check_cache_dir_is_shared
        try:
            check_cache_dir_is_shared(cache_dirs.split(",")[rank])
            result = "ok"
        except RuntimeError as err:
            result = str(err)
        with open(out + str(rank), "w") as f:
            f.write(result)
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.start_processes(run, args=tuple(sys.argv[1:]), nprocs=2, start_method="fork")
    """
)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "node_local"])
def test_cache_dir_must_be_seen_by_every_node(tmp_path, shared):
    # A node-local RUN_DIR/data_cache is the same path on each node but a different folder: here
    # each "node" gets its own folder, as its local disk would.
    dirs = (
        [tmp_path / "shared" / "cache"] * 2 if shared else [tmp_path / f"node{r}" / "cache" for r in (0, 1)]
    )
    script = tmp_path / "nodes.py"
    script.write_text(_NODES)
    out = str(tmp_path / "rank")
    cmd = [sys.executable, str(script), ",".join(map(str, dirs)), str(tmp_path / "store"), out]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [Path(out + str(r)).read_text() for r in range(2)]
    if shared:
        assert results == ["ok", "ok"]
        assert not list(dirs[0].iterdir()), "the marker file is removed"
    else:
        for rank, message in enumerate(results):  # every rank stops, naming the folder and the blind node
            assert message.startswith(f"data.cache_dir {dirs[rank]} is not visible from ")
            assert "(rank 1)" in message and "(rank 0)" not in message
            assert "filesystem all nodes share" in message and "\n" not in message


@pytest.mark.parametrize(
    "split",
    ["969,30,1", "90,10,0", "98,2", "1", "0,1,0", "0.7,0.2,0.1", "1,1,1", "3,0,7"]
    # adversarial: bounds on exact zeros and ones, sums other than 100 (1/3 and 1/7 do not round
    # evenly), tiny and huge parts
    + ["1,0,0", "99,1,0", "0,0,1", "33,33,33", "7,7,7", "1,2,4", "0.1,0.2,0.3", "999999,1,0", "1e3,2"],
)
def test_split_matrix_is_megatron_cores(split):
    """The launcher's split check cuts as megatron-core does without importing it (``split_matrix``
    mirrors ``parse_and_normalize_split`` then ``convert_split_vector_to_split_matrix``, 0.16's
    blended_megatron_dataset_config.py): the same matrix, bit for bit."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    from dense_model.data.gpt_dataset import split_matrix

    assert split_matrix(split) == convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
