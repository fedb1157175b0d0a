"""lm-eval's ``hf`` model on the exported folder gives our lm-eval model's log-likelihoods, request
for request (within 1e-4, float32, CPU), for a checkpoint whose tokenizer is Llama-style
SentencePiece (whitespace-only pieces for indentation): a multiple-choice task whose choices are
indented code lines and a rolling-loglikelihood task on indented code. Before the fix of issue 13
the exported tokenizer.json split every run of spaces and the two disagreed by tens of nats.

Megatron runs only in spawned workers; lm-eval's ``hf`` model runs here.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from dense_model.testing import (
    LLAMA_STYLE_SENTENCEPIECE,
    offline_env,
    spawn_workers,
    tiny_model_overrides,
    train_sentencepiece,
)

VOCAB, SEQ = 512, 64
TASKS = ["fidelity_code_mc", "fidelity_code_ppl"]
CONTEXTS = [
    "def total(values):\n    result = 0\n    for value in values:\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "if ready:\n\tstart()\nelse:\n",
    "for i in range(10):\n    if i % 2 == 0:\n       ",  # the example: context ends in spaces
    "try:\n    run()\nexcept ValueError:\n    ",
    "x = [\n    1,\n    22,\n",
]
BODIES = ["result += value\n", "return None\n", "pass\n", "print(i)  # 10\n"]
INDENTS = ["        ", "    ", "\t", "            ", " ", "  \t  "]
CODE_TEXTS = [
    "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n",
    "if __name__ == '__main__':\r\n    main()\r\n\t\t# tabs\r\n                    # twenty spaces\n",
    "    leading and trailing    \n\n\n    x = 1    y = 22    z = 333    \n",
]


MC_FIELDS = (
    'doc_to_text: "{{context}}"\ndoc_to_choice: choices\ndoc_to_target: answer\ntarget_delimiter: ""\n'
)
PPL_FIELDS = 'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'


def write_tasks(folder: Path) -> None:
    """A multiple-choice task (6 contexts x 4 indented continuations) and a rolling task."""
    docs = []
    for k, context in enumerate(CONTEXTS):
        choices = [INDENTS[(k + j) % len(INDENTS)] + BODIES[(k + j) % len(BODIES)] for j in range(4)]
        docs.append({"context": context, "choices": choices, "answer": k % 4})
    (folder / "code_mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "code_text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in CODE_TEXTS))
    common = "dataset_path: json\noutput_type: {kind}\ntest_split: test\nmetadata:\n  version: 1.0\n"
    tasks = {
        "fidelity_code_mc": (
            "code_mc.jsonl",
            "multiple_choice",
            MC_FIELDS + "metric_list:\n  - metric: acc\n",
        ),
        "fidelity_code_ppl": ("code_text.jsonl", "loglikelihood_rolling", PPL_FIELDS),
    }
    for task, (data, kind, fields) in tasks.items():
        (folder / f"{task}.yaml").write_text(
            f"task: {task}\ndataset_kwargs:\n  data_files:\n    test: {folder / data}\n"
            + common.format(kind=kind)
            + fields
        )


def _make_job(rank, world_size, out_dir, tokenizer):
    """A PolyNorm model on the Llama-style tokenizer, norms and PolyCom scalars moved off their
    init, saved and exported in float32."""
    from dense_model.checkpoint import save_checkpoint
    from dense_model.config import load_config
    from dense_model.export import export_hf
    from dense_model.model import build_model
    from dense_model.parallel import initialize_parallel

    initialize_parallel(1, 1, seed=11)
    cfg = load_config(
        None,
        [
            *tiny_model_overrides(vocab=VOCAB, seq=SEQ),
            "model.init_method_std=0.1",  # O(1) logits: a wrong token costs nats, not micro-nats
            f"data.tokenizer_model={tokenizer}",
            "training.recompute_granularity=none",
        ],
    )
    model = build_model(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name or ".activation_func." in name:
                param.add_(0.3 * torch.randn(param.shape))
    save_checkpoint(Path(out_dir) / "run" / "checkpoints", 1, model, cfg)
    export_hf(Path(out_dir) / "run", Path(out_dir) / "hf", dtype="float32")


def _ours_job(rank, world_size, out_dir):
    """Our lm-eval model ("dense_model") on the two tasks; per-request scores to ours.json."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import dense_model.evaluation  # noqa: F401  registers "dense_model" with lm-eval

    out = Path(out_dir)
    results = simple_evaluate(
        model="dense_model",
        model_args={"pretrained": str(out / "run"), "dtype": "float32"},
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(out / "tasks"), include_defaults=False),
        batch_size=4,
        log_samples=True,
    )
    (out / "ours.json").write_text(json.dumps(per_request(results)))


def per_request(results) -> dict[str, list[list[float]]]:
    """task -> for each document (by doc_id), the log-likelihood of each of its requests."""
    return {
        task: [
            [
                float(resp[0][0]) if isinstance(resp[0], (list, tuple)) else float(resp[0])
                for resp in s["resps"]
            ]
            for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])
        ]
        for task in TASKS
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity")
    tokenizer = train_sentencepiece(out, "llama_style", **LLAMA_STYLE_SENTENCEPIECE)
    (out / "tasks").mkdir()
    write_tasks(out / "tasks")
    spawn_workers(_make_job, 1, str(out), tokenizer, env=offline_env(out))
    spawn_workers(_ours_job, 1, str(out), env=offline_env(out))
    return out, tokenizer


@pytest.mark.slow
def test_hf_export_gives_our_loglikelihoods_on_indented_code(exported, monkeypatch):
    import sentencepiece
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out, tokenizer = exported
    for key, value in offline_env(out).items():
        if key.startswith("HF_"):
            monkeypatch.setenv(key, value)
    provenance = json.loads((out / "hf" / "dense_model.json").read_text())["tokenizer"]
    # made from the checkpoint's copy of the training tokenizer, byte for byte the trained one
    assert provenance["source"].endswith("iter_0000001/tokenizer.model")
    assert provenance["sha256"] == hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest()
    assert provenance["exported_as"] == "tokenizer.json"
    # the requests do hit SentencePiece's whitespace-only pieces, the case the fix is about
    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer)
    pieces = [p for text in CODE_TEXTS + CONTEXTS for p in sp.encode(text, out_type=str)]
    assert sum(set(p) == {"▁"} and len(p) > 1 for p in pieces) >= 10

    theirs = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(out / "hf"), "dtype": "float32", "trust_remote_code": True},
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(out / "tasks"), include_defaults=False),
        batch_size=4,
        device="cpu",
        log_samples=True,
    )
    ours = json.loads((out / "ours.json").read_text())
    theirs = per_request(theirs)
    assert [len(doc) for doc in ours["fidelity_code_mc"]] == [4] * len(CONTEXTS)
    assert len(ours["fidelity_code_ppl"]) == len(CODE_TEXTS)
    for task in TASKS:
        for doc_ours, doc_theirs in zip(ours[task], theirs[task], strict=True):
            for a, b in zip(doc_ours, doc_theirs, strict=True):
                assert abs(a - b) < 1e-4, f"{task}: ours {a} vs hf {b}"
    scores = [s for doc in ours["fidelity_code_mc"] for s in doc]
    assert len({round(s, 2) for s in scores}) > 12  # the choices score differently: a real comparison
