"""toolkits/pretrain_data_preprocessing: the thin CLIs and the shell wrapper, run as users run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "toolkits" / "pretrain_data_preprocessing"


def _run(cmd: list[str], **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=full_env)


@pytest.mark.slow
def test_shell_wrapper_makes_subset_datasets_and_a_blend(tmp_path, spm_model, texts, data_helpers):
    data_helpers.write_jsonl(str(tmp_path / "in" / "arxiv" / "a.jsonl"), [{"text": t} for t in texts[:30]])
    data_helpers.write_jsonl(
        str(tmp_path / "in" / "book" / "b.jsonl.zst"), [{"text": t} for t in texts[30:40]], "zst"
    )
    out = tmp_path / "out"
    proc = _run(
        [
            "bash",
            str(TOOLS / "run_make_pretraining_dataset.sh"),
            str(tmp_path / "in"),
            str(out),
            spm_model,
            "2",
        ],
        PYTHON=sys.executable,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "redpajama_blend.json").is_file()
    for subset in ("arxiv", "book"):
        assert (out / f"redpajama_{subset}_text_document.idx").is_file()
    assert proc.stdout.count("consistency: OK") == 2
    assert "documents: 40" in proc.stdout


def test_wrapper_usage_message():
    proc = _run(["bash", str(TOOLS / "run_make_pretraining_dataset.sh")])
    assert proc.returncode == 2 and "INPUT OUTPUT_DIR TOKENIZER_MODEL" in proc.stdout


def test_preprocess_cli_reports_errors_without_a_traceback(tmp_path, spm_model):
    proc = _run(
        [
            sys.executable,
            str(TOOLS / "preprocess_data.py"),
            "--input",
            str(tmp_path / "missing"),
            "--output-prefix",
            str(tmp_path / "o"),
            "--tokenizer-type",
            "sentencepiece",
            "--tokenizer-model",
            spm_model,
        ]
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --input") and "Traceback" not in proc.stderr


def test_merge_cli_folder_in_name_order(tmp_path, spm_model, sp, texts, data_helpers):
    from dense_model.data.preprocess import PreprocessConfig, preprocess

    parts = tmp_path / "parts"
    for name, chunk in (("b", texts[10:15]), ("a", texts[0:5])):
        path = data_helpers.write_jsonl(str(tmp_path / f"{name}.jsonl"), [{"text": t} for t in chunk])
        preprocess(
            PreprocessConfig(
                inputs=[path],
                output_prefix=str(parts / name),
                tokenizer_type="sentencepiece",
                tokenizer_model=spm_model,
                append_eod=True,
                progress=False,
            ),
            log=None,
        )
    proc = _run(
        [
            sys.executable,
            str(TOOLS / "merge_datasets.py"),
            "--input",
            str(parts),
            "--output-prefix",
            str(tmp_path / "m"),
        ]
    )
    assert proc.returncode == 0, proc.stderr
    assert "merged 2 datasets" in proc.stdout
    want = [sp.encode(t) + [sp.eos_id()] for t in texts[0:5] + texts[10:15]]
    assert data_helpers.read_dataset(str(tmp_path / "m")) == want


def test_train_tokenizer_and_inspect_clis(tmp_path, texts, data_helpers):
    path = data_helpers.write_jsonl(str(tmp_path / "a.jsonl"), [{"text": t} for t in texts])
    proc = _run(
        [
            sys.executable,
            str(TOOLS / "train_tokenizer.py"),
            "--input",
            path,
            "--model-prefix",
            str(tmp_path / "tok"),
            "--vocab-size",
            "600",
            "--num-threads",
            "1",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tok.model").is_file() and "trained" in proc.stdout
    proc = _run([sys.executable, str(TOOLS / "inspect_dataset.py"), str(tmp_path / "nothing")])
    assert proc.returncode == 2 and "does not exist" in proc.stderr  # bad input: exit 2 (dense_model.cli)


def _damaged(path: Path, kind: str, texts: list[str], data_helpers) -> str:
    """An input file of ``kind`` whose bytes cannot be decoded, and where the reader should stop."""
    rows = [{"text": t} for t in texts[:200]]
    if kind in ("zst", "gz"):
        whole = Path(data_helpers.write_jsonl(str(path / f"a.jsonl.{kind}"), rows, kind))
        data = whole.read_bytes()
        cut = len(data) // 2
        # zst: a run of garbage in the middle of the frame; gz: the stream cut short, as a copy killed midway
        whole.write_bytes(data[:cut] + b"\xff" * 64 + data[cut + 64 :] if kind == "zst" else data[:cut])
        return str(whole)
    bad = path / f"a.{kind}"
    bad.write_bytes((b"PAR1" if kind == "parquet" else b"ARROW1\0\0") + b"not a table" * 10)
    return str(bad)


@pytest.mark.parametrize("kind", ["zst", "gz", "parquet", "arrow"])
def test_a_damaged_input_file_is_one_line_naming_it_and_exit_2(
    tmp_path, spm_model, texts, data_helpers, kind, capsys
):
    """A truncated or damaged .zst/.gz, or a file that is not the Parquet/Arrow its name says: one
    "error:" line with the file's path and what to do, exit 2, no traceback, no dataset written."""
    from dense_model.data.preprocess.cli import main

    bad = _damaged(tmp_path, kind, texts, data_helpers)
    prefix = tmp_path / "out" / "d"
    prefix.parent.mkdir()
    args = ["--input", bad, "--output-prefix", str(prefix), "--tokenizer-type", "sentencepiece"]
    code = main([*args, "--tokenizer-model", spm_model, "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: cannot be read"), err
    assert "fetch it again, or leave it out of --input" in lines[0], err
    if kind in ("zst", "gz"):
        assert "after line " in lines[0], err
    assert not list(prefix.parent.glob("*.bin"))


def test_a_tokenizer_file_that_is_not_sentencepiece_is_one_line_and_exit_2(
    tmp_path, texts, data_helpers, capsys
):
    from dense_model.data.preprocess.cli import main

    data = data_helpers.write_jsonl(str(tmp_path / "a.jsonl"), [{"text": t} for t in texts[:5]])
    args = ["--input", data, "--output-prefix", str(tmp_path / "d"), "--tokenizer-type", "sentencepiece"]
    code = main([*args, "--tokenizer-model", data, "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(
        f"error: --tokenizer-model {data}: not a SentencePiece model"
    ), err
    assert "--tokenizer-type huggingface" in err, err


@pytest.mark.parametrize("where", ["under_a_file", "read_only"])
def test_an_output_prefix_that_cannot_be_created_is_one_line_and_exit_2(
    tmp_path, spm_model, texts, data_helpers, capsys, where
):
    """--output-prefix below a file (a typo'd path), or in a read-only file system (as root, permissions
    do not stop a write; a bind-mounted read-only folder would): one "error:" line naming the flag,
    the folder and the fix, exit 2, nothing written."""
    from dense_model.data.preprocess.cli import main

    data = data_helpers.write_jsonl(str(tmp_path / "a.jsonl"), [{"text": t} for t in texts[:5]])
    if where == "under_a_file":
        prefix, folder, why = f"{data}/out/d", f"{data}/out", f"{data} is a file, not a folder"
    else:  # /proc refuses new folders to everyone, root included
        prefix, folder, why = "/proc/dense_model_test/d", "/proc/dense_model_test", ""
    args = ["--input", data, "--output-prefix", prefix, "--tokenizer-type", "sentencepiece"]
    code = main([*args, "--tokenizer-model", spm_model, "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: --output-prefix {prefix}: cannot create the folder {folder} ({why}"), err
    assert err.rstrip().endswith("choose an --output-prefix in a folder you can write"), err
