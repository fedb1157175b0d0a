"""The laptop demo's data: a tokenizer and a blend of `examples/redpajama_sample`, made once, cached.

    from dense_model.data.demo import prepare_demo_dataset
    demo = prepare_demo_dataset("runs/demo_data")
    demo["tokenizer_model"], demo["blend"]

The first call trains a SentencePiece BPE tokenizer (vocab 4096, byte fallback, eos id 2) on the
sample and tokenises it per subset with EOD appended (a few seconds on 2 cores). Later calls find
both in `work_dir` and return at once; they redo the work only if the sample files changed (their
names and sizes are recorded in `work_dir/demo_stamp.json`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os

from dense_model.data.blend import load_blend
from dense_model.data.jsonl import expand_inputs
from dense_model.data.preprocess import PreprocessConfig, preprocess
from dense_model.data.train_tokenizer import train_sentencepiece

DEMO_VOCAB_SIZE = 4096
# configs/demo*.yaml's data.split: its valid part of each subset is text the demo never trains on.
DEMO_SPLIT = "90,10,0"
_STAMP = "demo_stamp.json"


def sample_dir() -> str:
    """examples/redpajama_sample of the repository that holds this package."""
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(repo_root, "examples", "redpajama_sample")
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"the demo sample {path} is missing: it ships with the repository checkout (regenerate it "
            "with `python scripts/make_redpajama_sample.py`); an installed wheel does not carry it."
        )
    return path


def _fingerprint(folder: str) -> list[list]:
    return [[os.path.relpath(p, folder), os.path.getsize(p)] for p in expand_inputs([folder])]


@contextlib.contextmanager
def _exclusive(work_dir: str):
    """Several processes (e.g. every rank of a launch) may call at once: one builds, the others wait."""
    fd = os.open(os.path.join(work_dir, ".demo.lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def demo_work_dir() -> str:
    """Where the demo's data is cached: ``$DENSE_MODEL_CACHE/demo_data`` (default ``.cache/demo_data``)."""
    return os.path.join(os.environ.get("DENSE_MODEL_CACHE", ".cache"), "demo_data")


def prepare_demo_dataset(work_dir: str) -> dict:
    """{'tokenizer_model': path of the .model, 'blend': path of the blend JSON} for the demo sample.

    Safe to call from several processes at once (a file lock in work_dir serialises them)."""
    work_dir = os.path.abspath(work_dir)
    os.makedirs(work_dir, exist_ok=True)
    with _exclusive(work_dir):
        return _prepare(work_dir)


def prepared_demo_dataset(work_dir: str) -> dict | None:
    """``prepare_demo_dataset``'s result if the demo's data is already built in work_dir (nothing is
    built or written), else None: what a dry run reads."""
    return _cached(os.path.abspath(work_dir))[0]


def _cached(work_dir: str) -> tuple[dict | None, dict]:
    """(the result if the cache in work_dir is complete and current, else None; the paths)."""
    folder = sample_dir()
    tokenizer_model = os.path.join(work_dir, "demo_tokenizer.model")
    blend = os.path.join(work_dir, "redpajama_sample") + "_blend.json"
    stamp_path = os.path.join(work_dir, _STAMP)
    result = {"tokenizer_model": tokenizer_model, "blend": blend}
    if os.path.isfile(stamp_path) and os.path.isfile(tokenizer_model) and os.path.isfile(blend):
        with open(stamp_path) as f:
            cached = json.load(f)
        if cached == _stamp(folder):
            try:
                load_blend(blend)  # every dataset it names is present
                return result, result
            except (FileNotFoundError, ValueError):
                pass
    return None, result


def _stamp(folder: str) -> dict:
    return {"sample": _fingerprint(folder), "vocab_size": DEMO_VOCAB_SIZE}


def _prepare(work_dir: str) -> dict:
    cached, result = _cached(work_dir)
    if cached is not None:
        return cached
    folder = sample_dir()
    tokenizer_model = result["tokenizer_model"]
    prefix = os.path.join(work_dir, "redpajama_sample")
    stamp_path = os.path.join(work_dir, _STAMP)
    stamp = _stamp(folder)

    if os.path.exists(stamp_path):
        os.remove(stamp_path)
    train_sentencepiece([folder], os.path.join(work_dir, "demo_tokenizer"), vocab_size=DEMO_VOCAB_SIZE)
    preprocess(
        PreprocessConfig(
            inputs=[folder],
            output_prefix=prefix,
            tokenizer_type="sentencepiece",
            tokenizer_model=tokenizer_model,
            append_eod=True,
            split_by_subset=True,
            workers=1,  # the sample is ~2 MB: a worker pool would cost more to start than it saves
            progress=False,
            restart=True,
        ),
        log=None,
    )
    tmp = stamp_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stamp, f)
    os.replace(tmp, stamp_path)
    return result


def demo_heldout_prefix(subset: str, work_dir: str | None = None) -> str:
    """The prefix of a dataset holding the documents of the demo's SUBSET (wikipedia, github, ...)
    that ``DEMO_SPLIT`` gives to validation, which the demo never trains on: what a named validation
    set ``demo:SUBSET`` (``data.validation_sets``) scores. Written on first use next to the demo data
    (which is prepared first if needed); ValueError naming the subsets for an unknown one."""
    import numpy as np

    from dense_model.data.gpt_dataset import split_matrix
    from dense_model.data.indexed import DocumentWriter, read_index_header

    work_dir = os.path.abspath(work_dir or demo_work_dir())
    prefixes = load_blend(prepare_demo_dataset(work_dir)["blend"])[0]
    by_subset = {
        os.path.basename(p).removeprefix("redpajama_sample_").removesuffix("_text_document"): p
        for p in prefixes
    }
    if subset not in by_subset:
        raise ValueError(
            f"demo:{subset}: the demo sample has no subset {subset!r}; use one of {', '.join(sorted(by_subset))}"
        )
    source = by_subset[subset]
    out = os.path.join(work_dir, f"heldout_{subset}_text_document")
    with _exclusive(work_dir):
        if os.path.isfile(out + ".idx") and os.path.getmtime(out + ".idx") >= os.path.getmtime(
            source + ".idx"
        ):
            return out
        header = read_index_header(source + ".idx")
        lengths, pointers = header.lengths(), header.pointers()
        n = header.sequence_count
        begin, end = (
            int(round(b * float(n))) for b in split_matrix(DEMO_SPLIT)[1]
        )  # as megatron-core cuts it
        tokens = np.memmap(source + ".bin", dtype=header.dtype, mode="r")
        writer = DocumentWriter(out, header.dtype)
        for i in range(begin, end):
            start = int(pointers[i]) // header.itemsize
            writer.add_flat(np.asarray(tokens[start : start + int(lengths[i])]), lengths[i : i + 1])
        writer.finish()
    return out
