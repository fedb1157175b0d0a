"""Parquet, Arrow (`save_to_disk`) and Hugging Face cache inputs: the same bytes as the same documents
as JSON lines, bad rows counted with their file and row, subsets from columns and folders."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dense_model.data.preprocess import preprocess
from tests.data.helpers import preprocess_config

_cfg = preprocess_config


def _records(texts: list[str]) -> dict:
    return {"text": texts, "meta": [{"i": j} for j in range(len(texts))]}


@pytest.fixture(scope="module")
def jsonl_reference(tmp_path_factory, spm_model, corpora, data_helpers):
    prefix = tmp_path_factory.mktemp("ref") / "out"
    preprocess(_cfg(spm_model, prefix, [corpora[None]]), log=None)
    return data_helpers.file_bytes(str(prefix) + "_text_document")


@pytest.mark.parametrize("workers", [1, 2])
def test_parquet_gives_the_jsonl_bytes(tmp_path, spm_model, texts, data_helpers, jsonl_reference, workers):
    folder = tmp_path / "pq"
    folder.mkdir()
    for i, part in enumerate([texts[0:80], texts[80:160], texts[160:]]):
        # 16-row groups: each file holds several groups, and a shard is one or more whole groups.
        pq.write_table(pa.table(_records(part)), folder / f"part_{i}.parquet", row_group_size=16)
    prefix = tmp_path / "out"
    summary = preprocess(
        _cfg(spm_model, prefix, [str(folder)], workers=workers, shard_size_mb=0.01), log=None
    )
    assert summary.shards > 3, "the row groups were not used as shards"
    assert summary.documents == len(texts) and summary.bad.total == 0
    assert data_helpers.file_bytes(str(prefix) + "_text_document") == jsonl_reference


def test_save_to_disk_folder_gives_the_jsonl_bytes(tmp_path, spm_model, texts, data_helpers, jsonl_reference):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict(_records(texts)).save_to_disk(str(saved), num_shards=3)
    prefix = tmp_path / "out"
    summary = preprocess(_cfg(spm_model, prefix, [str(saved)], workers=2, shard_size_mb=0.01), log=None)
    assert summary.shards > 3, "the Arrow files were not cut into row ranges"
    assert data_helpers.file_bytes(str(prefix) + "_text_document") == jsonl_reference


def test_hf_dataset_from_the_local_cache_gives_the_jsonl_bytes(
    tmp_path, monkeypatch, spm_model, texts, data_helpers, jsonl_reference
):
    import datasets

    # load_dataset on a local Parquet folder builds an Arrow cache, as a hub download would.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    source = tmp_path / "my_corpus"
    source.mkdir()
    pq.write_table(pa.table(_records(texts)), source / "train.parquet", row_group_size=50)
    prefix = tmp_path / "out"
    preprocess(_cfg(spm_model, prefix, hf_dataset=str(source), hf_split="train"), log=None)
    assert list((tmp_path / "hf_cache").rglob("*.arrow")), "the input was not read through the Arrow cache"
    assert data_helpers.file_bytes(str(prefix) + "_text_document") == jsonl_reference
    with pytest.raises(FileNotFoundError, match="--hf-dataset"):
        preprocess(_cfg(spm_model, tmp_path / "o2", hf_dataset=str(tmp_path / "absent")), log=None)


def test_bad_rows_are_skipped_and_counted_with_file_and_row(tmp_path, spm_model, sp, texts, data_helpers):
    folder = tmp_path / "in"
    folder.mkdir()
    column = list(texts[:40])
    column[5], column[17], column[33] = None, "", "   "  # rows 6, 18, 34 (1-based)
    pq.write_table(pa.table({"text": column}), folder / "a.parquet", row_group_size=4)
    pq.write_table(pa.table({"body": ["no text column"] * 3}), folder / "b.parquet")
    pq.write_table(pa.table({"text": [7, 8]}), folder / "c.parquet")
    prefix = tmp_path / "out"
    summary = preprocess(_cfg(spm_model, prefix, [str(folder)], workers=2, shard_size_mb=0.001), log=None)
    assert {r: n for r, n in summary.bad.counts.items() if n} == {
        "not_string": 1 + 2,
        "empty_text": 2,
        "missing_key": 3,
    }
    a, b = folder / "a.parquet", folder / "b.parquet"
    assert summary.bad.resolved_positions() == [
        f"{a} row 6 (not_string)",
        f"{a} row 18 (empty_text)",
        f"{a} row 34 (empty_text)",
        f"{b} row 1 (missing_key)",
        f"{b} row 2 (missing_key)",
    ]
    good = [t for i, t in enumerate(texts[:40]) if i not in (5, 17, 33)]
    docs = data_helpers.read_dataset(str(prefix) + "_text_document")
    assert docs == [sp.encode(t) + [sp.eos_id()] for t in good]


def test_subsets_from_columns_and_folders(tmp_path, spm_model, sp, texts, data_helpers):
    root = tmp_path / "rp"
    (root / "mixed").mkdir(parents=True)
    (root / "github").mkdir()
    pq.write_table(
        pa.table({"text": texts[0:3], "red_pajama_subset": ["arxiv", "book", "arxiv"]}),
        root / "mixed" / "m.parquet",
    )
    pq.write_table(
        pa.table({"text": texts[3:5], "meta": [{"x": 1}, {"x": 2}]}), root / "github" / "g.parquet"
    )
    prefix = tmp_path / "out" / "red"
    summary = preprocess(_cfg(spm_model, prefix, [str(root)], split_by_subset=True), log=None)
    subsets = {o.subset: o for o in summary.outputs}
    assert sorted(subsets) == ["arxiv", "book", "github"]
    eos = [sp.eos_id()]
    assert data_helpers.read_dataset(subsets["arxiv"].prefix) == [sp.encode(texts[i]) + eos for i in (0, 2)]
    assert data_helpers.read_dataset(subsets["github"].prefix) == [sp.encode(t) + eos for t in texts[3:5]]
