"""dense_model.data.preprocess: real SentencePiece, real megatron-core reader, real processes."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from dense_model.data.blend import REDPAJAMA_1T_TOKENS, load_blend
from dense_model.data.jsonl import BadLineError
from dense_model.data.preprocess import (
    NoDocumentsError,
    PreprocessConfig,
    ResumeError,
    preprocess,
)
from tests.data.helpers import preprocess_config, wait_for_done_shards
from tests.data.helpers import run_cli as _run_cli


def _cfg(spm_model, inputs, prefix, **kw) -> PreprocessConfig:
    return preprocess_config(spm_model, prefix, inputs if isinstance(inputs, list) else [inputs], **kw)


@pytest.mark.parametrize("compression", [None, "zst", "gz"], ids=["plain", "zstd", "gzip"])
def test_output_equals_tokenizer_encoding_and_is_identical_for_1_and_2_workers(
    tmp_path, spm_model, sp, texts, corpora, data_helpers, compression
):
    outputs = {}
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}" / "out"
        # 0.01 MB shards cut each plain file into several byte ranges; compressed files are one shard each.
        summary = preprocess(
            _cfg(spm_model, corpora[compression], prefix, workers=workers, shard_size_mb=0.01), log=None
        )
        assert summary.documents == len(texts)
        assert summary.bad.total == 0
        dataset = str(prefix) + "_text_document"
        assert summary.outputs[0].prefix == dataset
        outputs[workers] = data_helpers.file_bytes(dataset)
        docs = data_helpers.read_dataset(dataset)
        assert len(docs) == len(texts)
        for doc, text in zip(docs, texts):
            assert doc == sp.encode(text) + [sp.eos_id()]
        assert summary.tokens == sum(len(d) for d in docs)
        assert not os.path.exists(str(prefix) + ".shards"), "the work folder is removed after a finished run"
    assert outputs[1] == outputs[2], "bytes must not depend on the worker count"
    if compression is None:
        assert summary.shards > 3  # the plain files really were cut into byte ranges


def test_uint16_tokens_and_no_eod_without_append_eod(tmp_path, spm_model, sp, texts, corpora, data_helpers):
    prefix = tmp_path / "noeod"
    preprocess(_cfg(spm_model, corpora[None], prefix, append_eod=False), log=None)
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix) + "_text_document")
    assert ds.index.dtype == np.uint16  # vocab 512 < 65500, megatron's DType.optimal_dtype
    assert ds[3].tolist() == sp.encode(texts[3])


BAD_LINES = [
    (b'{"text": "lone surrogate \\ud800 here"}', "invalid_utf8"),  # found only when its batch is encoded
    (b"this is not json", "invalid_json"),
    (b'{"text": "unterminated', "invalid_json"),
    (b'{"content": "no text key"}', "missing_key"),
    (b"[1, 2, 3]", "missing_key"),
    (b'{"text": 42}', "not_string"),
    (b'{"text": null}', "not_string"),
    (b'{"text": ""}', "empty_text"),
    (b'{"text": "   \\n  "}', "empty_text"),
    (b'{"text": "caf\xe9 latin-1 byte"}', "invalid_utf8"),
]


def _bad_corpus(path: str, good: list[str]) -> tuple[list[bytes], dict[int, str]]:
    """Good documents with every kind of bad line spread among them; returns lines and {line: reason}."""
    lines, bad = [], {}
    g = iter(good)
    for i in range(len(good) + len(BAD_LINES)):
        if i % 7 == 3 and len(bad) < len(BAD_LINES):
            raw, reason = BAD_LINES[len(bad)]
            lines.append(raw)
            bad[len(lines)] = reason
        else:
            lines.append(json.dumps({"text": next(g)}).encode())
    lines.insert(10, b"")  # a blank line: ignored, not bad
    bad = {(n + 1 if n > 10 else n): r for n, r in bad.items()}
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return lines, bad


def test_bad_lines_are_skipped_counted_and_located(tmp_path, spm_model, sp, texts, data_helpers):
    good = texts[:60]
    path = str(tmp_path / "dump.jsonl")
    _, bad = _bad_corpus(path, good)
    prefix = tmp_path / "out"
    # Small shards: most bad lines sit in byte ranges that do not start at line 1.
    summary = preprocess(_cfg(spm_model, path, prefix, workers=2, shard_size_mb=0.004), log=None)
    assert summary.shards > 3
    expected = {}
    for reason in bad.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert {r: n for r, n in summary.bad.counts.items() if n} == expected
    assert summary.bad.blank_lines == 1
    first = sorted(bad)[:5]
    assert summary.bad.resolved_positions() == [f"{path}:{n} ({bad[n]})" for n in first]
    docs = data_helpers.read_dataset(str(prefix) + "_text_document")
    assert docs == [sp.encode(t) + [sp.eos_id()] for t in good]
    text = summary.format()
    assert "invalid_json 2" in text and f"{path}:{first[0]}" in text


def test_strict_stops_at_the_first_bad_line_and_writes_nothing(tmp_path, spm_model, texts):
    path = str(tmp_path / "dump.jsonl")
    _, bad = _bad_corpus(path, texts[:60])
    prefix = tmp_path / "out"
    with pytest.raises(BadLineError) as info:
        preprocess(_cfg(spm_model, path, prefix, strict=True), log=None)
    first = min(bad)
    assert info.value.line == first and info.value.reason == bad[first]
    assert f"{path}:{first}" in str(info.value)
    assert not any(p.name.startswith("out_") for p in tmp_path.iterdir()), "no output under a final name"


def _jsonl_with_bad_line(folder: Path, texts, index: int, bad: str) -> str:
    """100 good documents with line ``index`` (0-based) replaced by ``bad``; returns the path."""
    path = str(folder / "late.jsonl")
    lines = [json.dumps({"text": t}) for t in texts[:100]]
    lines[index] = bad
    Path(path).write_text("\n".join(lines) + "\n")
    return path


def test_strict_line_number_inside_a_later_byte_range(tmp_path, spm_model, texts):
    path = _jsonl_with_bad_line(tmp_path, texts, 87, '{"text": 1}')
    with pytest.raises(BadLineError) as info:
        preprocess(_cfg(spm_model, path, tmp_path / "o", strict=True, shard_size_mb=0.004), log=None)
    assert (info.value.line, info.value.reason) == (88, "not_string")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_midway_then_rerun_equals_an_uninterrupted_run(
    tmp_path, spm_model, corpora, data_helpers, workers
):
    inputs = [corpora[None], corpora["zst"]]
    args = ["--input", *inputs, "--tokenizer-type", "sentencepiece", "--tokenizer-model", spm_model]
    args += ["--append-eod", "--workers", str(workers), "--shard-size-mb", "0.01", "--no-progress"]

    reference = tmp_path / "ref" / "out"
    preprocess(_cfg(spm_model, inputs, reference, workers=2, shard_size_mb=0.01), log=None)

    prefix = tmp_path / "run" / "out"
    work = Path(str(prefix) + ".shards")
    proc = _run_cli(
        [*args, "--output-prefix", str(prefix), "--debug-batch-delay", "0.3"], start_new_session=True
    )
    wait_for_done_shards(proc, work, 3, timeout=120)
    os.kill(proc.pid, signal.SIGKILL)  # the main process only: workers must die with it
    proc.wait()
    time.sleep(0.5)
    done_after_kill = {p.name for p in work.glob("*.done.json")}
    assert len(done_after_kill) >= 3
    assert not Path(str(prefix) + "_text_document.bin").exists(), "nothing under the final names"
    assert not Path(str(prefix) + "_text_document.idx").exists()
    time.sleep(0.5)
    assert {p.name for p in work.glob("*.done.json")} == done_after_kill, "orphan workers kept writing"

    rerun = _run_cli([*args, "--output-prefix", str(prefix)])
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    assert f"resuming: {len(done_after_kill)} shards already done" in out
    assert data_helpers.file_bytes(str(prefix) + "_text_document") == data_helpers.file_bytes(
        str(reference) + "_text_document"
    )
    assert not work.exists()


def test_resume_refuses_other_settings_and_restart_discards(tmp_path, spm_model, corpora):
    prefix = tmp_path / "out"
    preprocess(_cfg(spm_model, corpora["gz"], prefix, keep_shards=True), log=None)
    with pytest.raises(ResumeError, match="append_eod"):
        preprocess(_cfg(spm_model, corpora["gz"], prefix, append_eod=False), log=None)
    summary = preprocess(_cfg(spm_model, corpora["gz"], prefix, append_eod=False, restart=True), log=None)
    assert summary.shards_reused == 0


def test_changed_input_redoes_only_its_shards(tmp_path, spm_model, texts, data_helpers, sp):
    folder = tmp_path / "in"
    for i in range(3):
        data_helpers.write_jsonl(
            str(folder / f"f{i}.jsonl"), [{"text": t} for t in texts[i * 10 : i * 10 + 10]]
        )
    prefix = tmp_path / "out"
    first = preprocess(_cfg(spm_model, str(folder), prefix, keep_shards=True), log=None)
    assert first.shards == 3
    again = preprocess(_cfg(spm_model, str(folder), prefix, keep_shards=True), log=None)
    assert again.shards_reused == 3
    data_helpers.write_jsonl(str(folder / "f1.jsonl"), [{"text": t} for t in texts[100:105]])
    changed = preprocess(_cfg(spm_model, str(folder), prefix), log=None)
    assert changed.shards_reused == 2
    docs = data_helpers.read_dataset(str(prefix) + "_text_document")
    want = texts[0:10] + texts[100:105] + texts[20:30]
    assert docs == [sp.encode(t) + [sp.eos_id()] for t in want]


def test_split_by_subset_writes_datasets_and_a_blend(tmp_path, spm_model, texts, data_helpers, sp):
    root = tmp_path / "redpajama"
    w = data_helpers.write_jsonl
    # subset from the record, from meta (SlimPajama style), and from the folder name
    w(
        str(root / "mixed" / "a.jsonl"),
        [
            {"text": texts[0], "red_pajama_subset": "arxiv"},
            {"text": texts[1], "meta": {"redpajama_set_name": "RedPajamaBook"}},
            {"text": texts[2], "red_pajama_subset": "arxiv"},
        ],
    )
    w(str(root / "github" / "g.jsonl.zst"), [{"text": texts[3], "meta": {"repo": "x"}}], "zst")
    w(str(root / "wikipedia" / "w.jsonl"), [{"text": texts[4]}, {"text": texts[5]}])
    prefix = tmp_path / "out" / "red"
    summary = preprocess(_cfg(spm_model, str(root), prefix, split_by_subset=True, workers=2), log=None)
    subsets = {o.subset: o for o in summary.outputs}
    assert sorted(subsets) == ["arxiv", "book", "github", "wikipedia"]
    assert subsets["arxiv"].prefix == str(prefix) + "_arxiv_text_document"
    eos = [sp.eos_id()]
    assert data_helpers.read_dataset(subsets["arxiv"].prefix) == [
        sp.encode(texts[0]) + eos,
        sp.encode(texts[2]) + eos,
    ]
    assert data_helpers.read_dataset(subsets["wikipedia"].prefix) == [sp.encode(t) + eos for t in texts[4:6]]

    blend_path = str(prefix) + "_blend.json"
    assert summary.blends == [blend_path]
    blend = json.loads(Path(blend_path).read_text())
    assert blend["version"] == 1 and blend["weighting"] == "tokens"
    assert [d["prefix"] for d in blend["datasets"]] == [f"red_{s}_text_document" for s in sorted(subsets)]
    total = sum(o.tokens for o in summary.outputs)
    for d in blend["datasets"]:
        assert d["tokens"] == subsets[d["subset"]].tokens
        assert d["weight"] == pytest.approx(d["tokens"] / total)
    prefixes, weights = load_blend(blend_path)
    assert prefixes == [subsets[s].prefix for s in sorted(subsets)]

    preprocess(
        _cfg(spm_model, str(root), prefix, split_by_subset=True, blend_weighting="redpajama", restart=True),
        log=None,
    )
    _, weights = load_blend(blend_path)
    rp = [REDPAJAMA_1T_TOKENS[s] for s in sorted(subsets)]
    assert weights == pytest.approx([r / sum(rp) for r in rp])


def _layout_corpus(root: Path, texts: list[str], data_helpers) -> None:
    """arxiv/ (the largest subset: 2 files), book/, wikipedia/ (the smallest); no subset fields."""
    parts = {"arxiv/a0.jsonl": texts[0:70], "arxiv/a1.jsonl": texts[70:140], "book/b.jsonl": texts[140:200]}
    parts["wikipedia/w.jsonl"] = texts[200:230]
    for name, part in parts.items():
        data_helpers.write_jsonl(
            str(root / name), [{"text": t, "meta": {"i": i}} for i, t in enumerate(part)]
        )


@pytest.mark.parametrize("workers", [1, 2])
def test_layout_subsets_merge_while_other_subsets_tokenise(
    tmp_path, spm_model, texts, data_helpers, monkeypatch, workers
):
    import dense_model.data.preprocess as pp
    from dense_model.data.jsonl import expand_inputs_with_roots

    root = tmp_path / "redpajama"
    _layout_corpus(root, texts, data_helpers)
    reference = tmp_path / "ref" / "red"
    ref = preprocess(
        _cfg(spm_model, str(root), reference, split_by_subset=True, shard_size_mb=0.01), log=None
    )
    assert [o.subset for o in ref.outputs] == ["arxiv", "book", "wikipedia"]

    # Subset after subset, the largest first: every arxiv shard is dispatched before any wikipedia one.
    # The first wikipedia shard waits (in its worker) until arxiv's output is published and arxiv's
    # shard files are deleted; a run that merges only after the last shard never gets there.
    prefix = tmp_path / "run" / "red"
    work = Path(str(prefix) + ".shards")
    arxiv_ids = {
        s.id
        for s in pp.plan_shards(expand_inputs_with_roots([str(root)]), int(0.01 * 1e6))
        if s.path_subset == "arxiv"
    }
    assert len(arxiv_ids) > 2
    arxiv_idx = Path(str(prefix) + "_arxiv_text_document.idx")
    seen, gave_up = tmp_path / "seen_arxiv_merged", tmp_path / "gave_up"
    tokenise = pp.process_shard

    def process_shard(spec, ctx, report):
        if spec.path_subset == "wikipedia" and not seen.exists() and not gave_up.exists():
            deadline = time.monotonic() + 120  # only a guard against waiting forever
            while time.monotonic() < deadline:
                shards_left = [p for p in work.glob("*.bin") if p.name.split(".")[0] in arxiv_ids]
                if arxiv_idx.exists() and not shards_left:
                    seen.touch()
                    break
                time.sleep(0.05)
            else:
                gave_up.touch()
        return tokenise(spec, ctx, report)

    monkeypatch.setattr("dense_model.data.preprocess.shard.process_shard", process_shard)
    # The patch reaches worker processes only if they are forked: say so, whatever threads other
    # tests left in this process (with one, the pool would spawn them).
    monkeypatch.setattr("dense_model.data.preprocess.pool.start_method", lambda: "fork")
    cfg = _cfg(
        spm_model,
        str(root),
        prefix,
        split_by_subset=True,
        subset_from="layout",
        shard_size_mb=0.01,
        workers=workers,
    )
    summary = preprocess(cfg, log=None)
    assert seen.exists(), "arxiv was not merged (and its shards deleted) before wikipedia was tokenised"
    assert [(o.subset, o.documents, o.tokens) for o in summary.outputs] == [
        (o.subset, o.documents, o.tokens) for o in ref.outputs
    ]
    for o in ref.outputs:
        assert data_helpers.file_bytes(
            o.prefix.replace(str(reference), str(prefix))
        ) == data_helpers.file_bytes(o.prefix)
    assert Path(str(prefix) + "_blend.json").read_text() == Path(str(reference) + "_blend.json").read_text()
    assert not work.exists()


def test_shards_are_tokenised_largest_first_and_by_subset_with_layout_subsets(
    tmp_path, spm_model, texts, data_helpers, monkeypatch
):
    import dense_model.data.preprocess as pp

    root = tmp_path / "in"
    _layout_corpus(root, texts, data_helpers)
    seen: list[tuple[str, int]] = []
    tokenise = pp.process_shard

    def process_shard(spec, ctx, report):
        seen.append((spec.path_subset, spec.input_bytes))
        return tokenise(spec, ctx, report)

    monkeypatch.setattr("dense_model.data.preprocess.shard.process_shard", process_shard)
    # 0.02 MB shards: the files' last byte ranges are shorter than the others.
    preprocess(_cfg(spm_model, str(root), tmp_path / "a", shard_size_mb=0.02), log=None)
    sizes = [n for _, n in seen]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) > 2

    seen.clear()
    layout = _cfg(spm_model, str(root), tmp_path / "b", shard_size_mb=0.02, split_by_subset=True)
    preprocess(dataclasses.replace(layout, subset_from="layout"), log=None)
    subsets = [s for s, _ in seen]
    assert list(dict.fromkeys(subsets)) == ["arxiv", "book", "wikipedia"]  # the largest subset first
    assert subsets == sorted(subsets), "one subset after the other"
    for subset in ("arxiv", "book", "wikipedia"):
        sizes = [n for s, n in seen if s == subset]
        assert sizes == sorted(sizes, reverse=True)


def test_subset_from_layout_ignores_the_records_subset_fields(tmp_path, spm_model, sp, texts, data_helpers):
    root = tmp_path / "in"
    data_helpers.write_jsonl(
        str(root / "arxiv" / "a.jsonl"), [{"text": texts[0]}, {"text": texts[1], "red_pajama_subset": "book"}]
    )
    by_record = preprocess(_cfg(spm_model, str(root), tmp_path / "r", split_by_subset=True), log=None)
    assert [(o.subset, o.documents) for o in by_record.outputs] == [("arxiv", 1), ("book", 1)]
    layout = _cfg(spm_model, str(root), tmp_path / "l", split_by_subset=True, subset_from="layout")
    assert [(o.subset, o.documents) for o in preprocess(layout, log=None).outputs] == [("arxiv", 2)]
    assert data_helpers.read_dataset(f"{tmp_path}/l_arxiv_text_document") == [
        sp.encode(t) + [sp.eos_id()] for t in texts[:2]
    ]
    with pytest.raises(ValueError, match="--subset-from layout .* add --split-by-subset"):
        preprocess(_cfg(spm_model, str(root), tmp_path / "x", subset_from="layout"), log=None)


def test_several_json_keys_write_one_dataset_each(tmp_path, spm_model, sp, data_helpers):
    path = data_helpers.write_jsonl(
        str(tmp_path / "qa.jsonl"),
        [{"question": f"Question {i}?", "answer": f"Answer number {i}."} for i in range(5)],
    )
    prefix = tmp_path / "qa"
    summary = preprocess(_cfg(spm_model, path, prefix, json_keys=["question", "answer"]), log=None)
    assert [o.prefix for o in summary.outputs] == [f"{prefix}_question_document", f"{prefix}_answer_document"]
    assert data_helpers.read_dataset(f"{prefix}_answer_document")[4] == sp.encode("Answer number 4.") + [
        sp.eos_id()
    ]


def test_no_documents_is_an_error_and_writes_nothing(tmp_path, spm_model, data_helpers):
    path = data_helpers.write_jsonl(str(tmp_path / "bad.jsonl"), [{"body": "x"}, "not json"])
    with pytest.raises(NoDocumentsError, match="missing_key 1"):
        preprocess(_cfg(spm_model, path, tmp_path / "o"), log=None)
    assert not list(tmp_path.glob("o_*"))


def test_input_errors_name_the_argument(tmp_path, spm_model):
    with pytest.raises(FileNotFoundError, match="--input"):
        preprocess(_cfg(spm_model, str(tmp_path / "nope"), tmp_path / "o"), log=None)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unsupported file type"):
        preprocess(_cfg(spm_model, str(tmp_path / "x.txt"), tmp_path / "o"), log=None)
    with pytest.raises(FileNotFoundError, match="--tokenizer-model"):
        preprocess(_cfg(str(tmp_path / "missing.model"), str(tmp_path), tmp_path / "o"), log=None)


def test_strict_with_worker_processes(tmp_path, spm_model, texts):
    path = _jsonl_with_bad_line(tmp_path, texts, 60, "oops")
    with pytest.raises(BadLineError) as info:
        preprocess(
            _cfg(spm_model, path, tmp_path / "o", strict=True, workers=2, shard_size_mb=0.004), log=None
        )
    assert (info.value.line, info.value.reason) == (61, "invalid_json")


def test_huggingface_tokenizer_with_workers(tmp_path, texts, corpora, data_helpers):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    backend.save(str(tmp_path / "tokenizer.json"))
    prefix = tmp_path / "hf"
    cfg = _cfg(
        str(tmp_path / "tokenizer.json"), corpora["zst"], prefix, tokenizer_type="huggingface", workers=2
    )
    summary = preprocess(cfg, log=None)
    eod = backend.token_to_id("<|endoftext|>")
    docs = data_helpers.read_dataset(str(prefix) + "_text_document")
    assert summary.documents == len(texts)
    assert docs == [backend.encode(t, add_special_tokens=False).ids + [eod] for t in texts]


@pytest.mark.slow
@pytest.mark.parametrize("subset_from", ["record", "layout"])
def test_sigkill_during_the_merge_then_rerun_keeps_the_published_outputs(
    tmp_path, spm_model, corpora, data_helpers, subset_from
):
    root = str(Path(corpora[None]).parent)  # plain/, zst/, gz/: three outputs to merge
    reference = tmp_path / "ref" / "red"
    ref = preprocess(_cfg(spm_model, root, reference, split_by_subset=True), log=None)
    prefix = tmp_path / "run" / "red"
    work = Path(str(prefix) + ".shards")
    args = ["--input", root, "--tokenizer-type", "sentencepiece", "--tokenizer-model", spm_model]
    args += [
        "--append-eod",
        "--split-by-subset",
        "--subset-from",
        subset_from,
        "--workers",
        "1",
        "--no-progress",
        "--output-prefix",
        str(prefix),
    ]
    # The delay also follows each merged output: the kill lands between two outputs' merges (with
    # layout subsets, the first output is merged while the other subsets are being tokenised).
    proc = _run_cli([*args, "--debug-batch-delay", "2"], start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not list(work.glob("published.*.json")):
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.communicate()[0]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    published = [o.prefix.replace(str(reference), str(prefix)) for o in ref.outputs]
    done = [p for p in published if Path(p + ".idx").exists()]
    assert 1 <= len(done) < len(published), done
    inodes = {p: (os.stat(p + ".bin").st_ino, os.stat(p + ".bin").st_mtime_ns) for p in done}

    rerun = _run_cli(args)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    for p in done:
        assert f"{p}.bin/.idx was published by an earlier run; kept" in out
        assert (os.stat(p + ".bin").st_ino, os.stat(p + ".bin").st_mtime_ns) == inodes[p], "merged again"
    for o in ref.outputs:
        merged = o.prefix.replace(str(reference), str(prefix))
        assert data_helpers.file_bytes(merged) == data_helpers.file_bytes(o.prefix)
    assert not work.exists()


def test_progress_lines_count_input_as_stored_and_characters_tokenised(tmp_path, spm_model, texts, corpora):
    lines: list[str] = []
    summary = preprocess(_cfg(spm_model, corpora["zst"], tmp_path / "o", log_interval=0), log=lines.append)
    progress = [line for line in lines if line.startswith("progress:")]
    assert progress
    stored = sum(p.stat().st_size for p in Path(corpora["zst"]).iterdir()) / 1e6  # compressed sizes
    assert f"{stored:,.1f} of {stored:,.1f} MB of input read" in progress[-1]
    assert f"{sum(map(len, texts)) / 1e6:,.1f} M characters tokenised" in progress[-1]
    # The merge reports as it copies, shard after shard (here: every shard, log_interval=0).
    merging = [line for line in lines if line.startswith("merge:") and "ready so far merged" in line]
    assert len(merging) == summary.shards == 3
    token_mb = summary.tokens * 2 / 1e6  # uint16 tokens
    assert f"{token_mb:,.1f} of the {token_mb:,.1f} MB ready so far merged" in merging[-1]


def test_worker_pool_leaves_no_thread_behind_and_spawns_beside_other_threads(
    tmp_path, spm_model, corpora, texts
):
    import threading

    import dense_model.data.preprocess as pp

    before = set(threading.enumerate())
    preprocess(_cfg(spm_model, corpora["zst"], tmp_path / "o", workers=2), log=None)
    bad = _jsonl_with_bad_line(tmp_path, texts, 60, "oops")
    with pytest.raises(BadLineError) as failed:  # a run that fails keeps its frames alive in the error
        preprocess(
            _cfg(spm_model, bad, tmp_path / "b", strict=True, workers=2, shard_size_mb=0.004), log=None
        )
    assert set(threading.enumerate()) == before, "a thread of the run outlives it (later pools cannot fork)"
    assert failed.value.line == 61

    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert pp.start_method() == "spawn", "fork beside another thread may copy a held lock"
    finally:
        stop.set()
        other.join()
    if threading.active_count() == 1:
        assert pp.start_method() == ("fork" if sys.platform == "linux" else "spawn")
