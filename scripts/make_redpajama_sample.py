"""Build `examples/redpajama_sample/`: a small RedPajama-format corpus made only from text that
CPython ships (no download), for the laptop demo and the preprocessing examples.

    python scripts/make_redpajama_sample.py            # rewrites examples/redpajama_sample/
    python scripts/make_redpajama_sample.py --check    # exit 1 if the committed sample differs

Layout (one folder per RedPajama subset, like the real download):

| subset | made from | file | subset recorded as |
|---|---|---|---|
| arxiv | `pydoc_data.topics`, dressed as LaTeX papers | `arxiv/arxiv_sample.jsonl` | `red_pajama_subset` |
| book | `pydoc_data.topics`, grouped into chapters | `book/book_sample.jsonl` | `red_pajama_subset` |
| wikipedia | stdlib module docstrings (read with `ast`, never imported) | `wikipedia/*.jsonl` (2 files) | `meta.redpajama_set_name` (SlimPajama style) |
| stackexchange | stdlib function docstrings as questions and answers | `stackexchange/*.jsonl.zst` | `red_pajama_subset` |
| github | stdlib source files | `github/github_sample.jsonl.gz` | folder name only |

The output is deterministic for a given Python version (the committed sample was made with
CPython 3.11.7): no randomness, files and members visited in sorted order, compressed with fixed
settings (zstd level 10, gzip mtime 0).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import io
import json
import os
import sys
import sysconfig
from pathlib import Path

import zstandard

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "examples" / "redpajama_sample"

# Byte budgets per subset (uncompressed text): about 1.9 MB in all, inside the 1-3 MB target.
BUDGET = {
    "arxiv": 300_000,
    "book": 400_000,
    "wikipedia": 450_000,
    "stackexchange": 300_000,
    "github": 450_000,
}


def _topics() -> list[tuple[str, str]]:
    import pydoc_data.topics

    return sorted((name, body.strip()) for name, body in pydoc_data.topics.topics.items() if body.strip())


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None


def _take(records: list[dict], budget: int) -> list[dict]:
    out, used = [], 0
    for rec in records:
        if used >= budget:
            break
        out.append(rec)
        used += len(rec["text"].encode("utf-8"))
    return out


def make_arxiv() -> list[dict]:
    records = []
    for i, (name, body) in enumerate(_topics()):
        paragraphs = [p.strip() for p in body.split("\n\n") if p.strip()]
        if len(paragraphs) < 3:
            continue
        title = name.replace("-", " ").title()
        parts = [
            f"\\title{{On {title} in the Python Language}}",
            f"\\begin{{abstract}}\n{paragraphs[0]}\n\\end{{abstract}}",
            "\\section{Introduction}",
        ]
        for j, para in enumerate(paragraphs[1:], start=1):
            if j % 6 == 0:
                parts.append(f"\\section{{Part {j // 6 + 1}}}")
            parts.append(para)
        records.append(
            {
                "text": "\n\n".join(parts),
                "meta": {"arxiv_id": f"2401.{i:05d}", "language": "en", "source": "pydoc_data.topics"},
                "red_pajama_subset": "arxiv",
            }
        )
    return _take(records, BUDGET["arxiv"])


def make_book() -> list[dict]:
    topics = _topics()
    records, chapter, size, book_no = [], [], 0, 0
    # Walk the topics backwards so that the books do not repeat the arxiv papers' first topics.
    for name, body in reversed(topics):
        chapter.append(f"Chapter: {name.replace('-', ' ')}\n\n{body}")
        size += len(body)
        if size > 40_000:
            book_no += 1
            records.append(
                {
                    "text": f"The Python Reference, Volume {book_no}\n\n" + "\n\n\n".join(chapter),
                    "meta": {
                        "title": f"The Python Reference, Volume {book_no}",
                        "source": "pydoc_data.topics",
                    },
                    "red_pajama_subset": "book",
                }
            )
            chapter, size = [], 0
    return _take(records, BUDGET["book"])


def make_wikipedia() -> list[dict]:
    records = []
    for path in _stdlib_files():
        tree = _parse(path)
        if tree is None:
            continue
        doc = ast.get_docstring(tree)
        if not doc or len(doc) < 200:
            continue
        sections = [f"{path.stem}\n\n{doc}"]
        for node in tree.body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef) and not node.name.startswith("_"):
                sub = ast.get_docstring(node)
                if sub and len(sub) > 80:
                    sections.append(f"== {node.name} ==\n\n{sub}")
        records.append(
            {
                "text": "\n\n".join(sections),
                "meta": {"title": path.stem, "language": "en", "redpajama_set_name": "RedPajamaWikipedia"},
            }
        )
    return _take(records, BUDGET["wikipedia"])


def make_stackexchange() -> list[dict]:
    records = []
    for path in reversed(_stdlib_files()):
        tree = _parse(path)
        if tree is None:
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if not doc or len(doc) < 120:
                    continue
                args = ", ".join(a.arg for a in node.args.args)
                text = (
                    f"Q: What does {path.stem}.{node.name}({args}) do, and when should I use it?\n\n"
                    f"I found `{path.stem}.{node.name}` in the standard library but the behaviour is "
                    f"not obvious to me.\n\nA: From its documentation:\n\n{doc}"
                )
                records.append(
                    {
                        "text": text,
                        "meta": {"question": f"{path.stem}.{node.name}", "language": "en"},
                        "red_pajama_subset": "stackexchange",
                    }
                )
    return _take(records, BUDGET["stackexchange"])


def make_github() -> list[dict]:
    records = []
    for path in _stdlib_files():
        size = path.stat().st_size
        if not 2_000 <= size <= 25_000:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        records.append(
            {
                "text": text,
                "meta": {
                    "repo_name": "python/cpython",
                    "path": f"Lib/{path.name}",
                    "language": "Python",
                    "license": "PSF-2.0",
                },
            }
        )
    return _take(records, BUDGET["github"])


def _jsonl(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records)


def build_files() -> dict[str, bytes]:
    """Relative path -> exact file bytes."""
    files: dict[str, bytes] = {}
    files["arxiv/arxiv_sample.jsonl"] = _jsonl(make_arxiv())
    files["book/book_sample.jsonl"] = _jsonl(make_book())
    wiki = make_wikipedia()
    half = len(wiki) // 2
    files["wikipedia/wikipedia_sample_00.jsonl"] = _jsonl(wiki[:half])
    files["wikipedia/wikipedia_sample_01.jsonl"] = _jsonl(wiki[half:])
    files["stackexchange/stackexchange_sample.jsonl.zst"] = zstandard.ZstdCompressor(level=10).compress(
        _jsonl(make_stackexchange())
    )
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
        gz.write(_jsonl(make_github()))
    files["github/github_sample.jsonl.gz"] = buf.getvalue()
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=str(DEFAULT_OUT), help="where to write the sample")
    parser.add_argument("--check", action="store_true", help="compare with the files on disk, write nothing")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    files = build_files()
    if args.check:
        bad = [
            rel
            for rel, data in files.items()
            if not (out / rel).is_file() or (out / rel).read_bytes() != data
        ]
        for rel in bad:
            print(f"differs: {out / rel}")
        return 1 if bad else 0
    for rel, data in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        print(f"{path.relative_to(out)}: {len(data):,} bytes")
    print(f"total on disk: {sum(len(d) for d in files.values()):,} bytes in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
