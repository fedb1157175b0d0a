"""Blend files: which datasets training mixes, and with what weights.

`preprocess_data.py --split-by-subset` writes `OUTPUT_PREFIX_blend.json` next to its outputs:

    {"version": 1, "weighting": "tokens" | "redpajama",
     "datasets": [{"subset": "arxiv", "prefix": "red_arxiv_text_document", "weight": 0.031,
                   "documents": 63, "tokens": 81234}, ...]}

`prefix` is relative to the blend file's folder, so the folder can be moved as a whole. Weights
sum to 1. "tokens" weights each subset by the tokens it holds (one pass over the data, as
megatron-core does with no weights); "redpajama" weights it by its share of RedPajama-1T
(`REDPAJAMA_1T_TOKENS`), which reproduces the full mix from a partial download.

    from dense_model.data.blend import load_blend
    prefixes, weights = load_blend("data/red_blend.json")   # absolute prefixes, for megatron-core
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

BLEND_VERSION = 1
WEIGHTINGS = ("tokens", "redpajama")

# RedPajama-1T token counts per subset, in billions (the paper's table; docs/paper.md).
REDPAJAMA_1T_TOKENS: dict[str, int] = {
    "common_crawl": 878,
    "c4": 175,
    "github": 59,
    "arxiv": 28,
    "book": 26,
    "wikipedia": 24,
    "stackexchange": 20,
}


def blend_weights(datasets: Sequence[dict], weighting: str) -> list[float]:
    """Normalised weights for entries with `subset` and `tokens`, under a weighting scheme."""
    if weighting == "tokens":
        raw = [float(d["tokens"]) for d in datasets]
    elif weighting == "redpajama":
        unknown = sorted({d["subset"] for d in datasets} - REDPAJAMA_1T_TOKENS.keys())
        if unknown:
            raise ValueError(
                f"--blend-weighting redpajama: subset(s) {', '.join(unknown)} are not RedPajama-1T subsets "
                f"({', '.join(REDPAJAMA_1T_TOKENS)}); use --blend-weighting tokens, or rename the folders."
            )
        raw = [float(REDPAJAMA_1T_TOKENS[d["subset"]]) for d in datasets]
    else:
        raise ValueError(f"--blend-weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
    total = sum(raw)
    if total <= 0:
        raise ValueError("cannot weight a blend whose datasets hold no tokens")
    return [r / total for r in raw]


def write_blend(path: str, datasets: Sequence[dict], weighting: str) -> dict:
    """Write a blend file atomically. `datasets`: dicts with subset, prefix (absolute or relative to
    the current folder), documents, tokens. Returns the written JSON object."""
    folder = os.path.dirname(os.path.abspath(path))
    weights = blend_weights(datasets, weighting)
    blend = {
        "version": BLEND_VERSION,
        "weighting": weighting,
        "datasets": [
            {
                "subset": d["subset"],
                "prefix": os.path.relpath(os.path.abspath(d["prefix"]), folder),
                "weight": w,
                "documents": int(d["documents"]),
                "tokens": int(d["tokens"]),
            }
            for d, w in zip(datasets, weights)
        ],
    }
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(blend, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return blend


def read_blend(path: str) -> dict:
    """Parse and validate a blend file; prefixes are returned as written (relative)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"blend file {path} does not exist; make one with toolkits/pretrain_data_preprocessing/"
            "preprocess_data.py --split-by-subset (it writes OUTPUT_PREFIX_blend.json)."
        )
    try:
        with open(path, encoding="utf-8") as f:
            blend = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(
            f"blend file {path} is not valid JSON ({err}); regenerate it with preprocess_data.py"
        ) from err
    problems = []
    if not isinstance(blend, dict):
        problems.append("the top level is not an object")
    else:
        if blend.get("version") != BLEND_VERSION:
            problems.append(f"version is {blend.get('version')!r}, expected {BLEND_VERSION}")
        datasets = blend.get("datasets")
        if not isinstance(datasets, list) or not datasets:
            problems.append("'datasets' must be a non-empty list")
        else:
            for i, d in enumerate(datasets):
                if not isinstance(d, dict) or not isinstance(d.get("prefix"), str):
                    problems.append(f"datasets[{i}] has no string 'prefix'")
                elif not isinstance(d.get("weight"), int | float) or d["weight"] < 0:
                    problems.append(f"datasets[{i}] ({d['prefix']}) has no non-negative number 'weight'")
    if problems:
        raise ValueError(
            f"blend file {path} is malformed: {'; '.join(problems)}. Regenerate it with preprocess_data.py."
        )
    return blend


def load_blend(path: str) -> tuple[list[str], list[float]]:
    """(absolute dataset prefixes, weights) from a blend file, ready for megatron-core's `blend`.

    Raises FileNotFoundError for a missing blend file or a dataset whose .bin/.idx is missing,
    ValueError for bad JSON or a malformed file; each message names the file and the fix.
    """
    blend = read_blend(path)
    folder = os.path.dirname(os.path.abspath(path))
    prefixes, weights = [], []
    for d in blend["datasets"]:
        prefix = os.path.normpath(os.path.join(folder, d["prefix"]))
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise FileNotFoundError(
                    f"blend file {path} lists dataset {d['prefix']!r} but {prefix}{ext} is missing. "
                    "Keep the blend file in the folder of its datasets (prefixes are relative to it), "
                    "or rerun preprocess_data.py to regenerate them."
                )
        prefixes.append(prefix)
        weights.append(float(d["weight"]))
    return prefixes, weights
