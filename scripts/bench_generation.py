"""Greedy generation in the lm-eval adapter: megatron-core's KV cache against re-running the sequence.

Builds a model (the demo's shape unless overridden), saves it as a dense_model checkpoint with a
SentencePiece tokenizer trained on CPython's docs, loads it through the lm-eval model
(``DenseModelLM``) and times, side by side in one process, the same requests through

  * ``cached``:    ``DenseModelLM.generate_until`` (static-batching KV cache: one prefill to the
                   batch's shortest prompt, then one position per forward), and
  * ``recompute``: the loop it replaced: each new token re-runs every batch row's whole sequence.

Both greedy; the script checks that they produce the same text and prints a markdown table.

    python scripts/bench_generation.py                                    # CPU: demo model, seq 512
    python scripts/bench_generation.py --new 256 --batch 8 model.num_layers=8

Extra ``key=value`` arguments are config overrides (``configs/demo.yaml`` is the base).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from dense_model.benchmarking import markdown_table, metadata_lines, run_metadata  # noqa: E402
from dense_model.checkpoint import save_checkpoint  # noqa: E402
from dense_model.config import load_config, resolve_vocab_size  # noqa: E402
from dense_model.evaluation import DenseModelLM  # noqa: E402
from dense_model.model import build_model  # noqa: E402
from dense_model.parallel import initialize_parallel  # noqa: E402
from dense_model.testing import python_docs_text  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seq", type=int, default=512, help="model sequence length")
    p.add_argument("--new", type=int, default=128, help="max_gen_toks per request")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--batch", type=int, default=4, help="lm-eval batch size")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats of each method (best is kept)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return p.parse_args(argv)


def recompute_generate(lm, contexts: list[str], max_new: int) -> list[str]:
    """The former generate loop: per new token, logits of every row's full sequence (no stop strings)."""
    budget = lm.max_length - max_new
    prompts = [lm.tok_encode(c, left_truncate_len=budget) or [lm.prefix_token_id] for c in contexts]
    generated: list[list[int]] = [[] for _ in contexts]
    running = list(range(len(contexts)))
    for _ in range(max_new):
        if not running:
            break
        sequences = [prompts[i] + generated[i] for i in running]
        logits = lm.logits(sequences)  # [b, s, vocab]
        still = []
        for row, i in enumerate(running):
            token = int(logits[row, len(sequences[row]) - 1].argmax())
            if token != lm.eot_token_id:
                generated[i].append(token)
                still.append(i)
        running = still
    return [lm.tok_decode(g) for g in generated]


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_generation_"))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> int:
    docs = python_docs_text()
    (work / "corpus.txt").write_text("\n".join(docs), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(work / "corpus.txt"), model_prefix=str(work / "tok"), vocab_size=4096, model_type="bpe",
        byte_fallback=True, num_threads=os.cpu_count(), minloglevel=2, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
    )  # fmt: skip
    cfg = load_config(
        str(REPO / "configs" / "demo.yaml"),
        [f"model.seq_length={args.seq}", f"data.tokenizer_model={work / 'tok.model'}", "data.demo=false",
         "training.bf16=false", *args.overrides],
    )  # fmt: skip
    cfg.model.vocab_size = resolve_vocab_size(cfg)  # the tokenizer's (4096), as the trainer resolves it
    initialize_parallel(1, 1, seed=cfg.training.seed)
    torch.manual_seed(0)
    model = build_model(cfg)
    save_checkpoint(work / "checkpoints", 1, model, cfg)
    lm = DenseModelLM(pretrained=str(work), batch_size=args.batch, dtype="float32")

    # Prompts of varied length, all ending mid-text, so that the model keeps generating.
    paragraphs = [d for d in docs if len(d) > 200]
    contexts = [paragraphs[i * 7][: 150 + 97 * i] for i in range(args.requests)]
    gen_kwargs = {"until": [], "max_gen_toks": args.new}
    requests = [Instance("generate_until", {}, (c, gen_kwargs), i) for i, c in enumerate(contexts)]

    times: dict[str, float] = {}
    outputs: dict[str, list[str]] = {}
    for name in ("cached", "recompute"):
        for _ in range(args.repeats):
            start = time.perf_counter()
            if name == "cached":
                out = lm.generate_until(requests, disable_tqdm=True)
            else:
                out = []
                for first in range(0, len(contexts), args.batch):
                    out += recompute_generate(lm, contexts[first : first + args.batch], args.new)
            elapsed = time.perf_counter() - start
            times[name] = min(times.get(name, float("inf")), elapsed)
            outputs[name] = out
    same = outputs["cached"] == outputs["recompute"]
    tokens = sum(len(lm.tok_encode(t)) for t in outputs["cached"])

    m = cfg.model
    print(metadata_lines(run_metadata()) + f"; {torch.get_num_threads()} threads")
    print(
        f"Model: {sum(p.numel() for p in model.parameters()):,} parameters ({m.num_layers} layers, hidden {m.hidden_size}, "
        f"{m.activation}), seq {args.seq}; {args.requests} requests, batch {args.batch}, "
        f"max_gen_toks {args.new}, about {tokens} tokens generated; same text from both: {same}\n"
    )
    rows = [
        [
            name,
            f"{times[name]:.2f}",
            f"{tokens / times[name]:.1f}",
            f"{times['recompute'] / times[name]:.2f}x",
        ]
        for name in ("cached", "recompute")
    ]
    print(markdown_table(["method", f"seconds (best of {args.repeats})", "tokens/s", "speed-up"], rows))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
