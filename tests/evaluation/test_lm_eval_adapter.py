"""lm-eval on our checkpoints: the shipped local tasks through run_lm_eval.sh, checked against
loglikelihoods / rolling windows / greedy generations computed by hand from the model's logits,
against lm-eval's own ``hf`` model on the exported folder, and at TP=2; clear errors.

Megatron runs only in subprocesses and spawned workers (its CPU layer and process groups must not
leak into pytest); lm-eval's ``hf`` model runs here.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dense_model.testing import offline_env, spawn_workers, tiny_model_overrides

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "toolkits" / "evaluation" / "run_lm_eval.sh"
TASK_DIR = REPO / "examples" / "lm_eval_tasks"
TASKS = ["tiny_python_mc", "tiny_python_ppl", "tiny_python_gen"]
ITERATION = 3
VOCAB, SEQ = 512, 64  # paragraphs of tiny_python_ppl are longer than SEQ: several rolling windows


def tiny_config(tokenizer):
    from dense_model.config import load_config

    return load_config(
        None,
        [
            *tiny_model_overrides(vocab=VOCAB, seq=SEQ),
            "model.make_vocab_size_divisible_by=96",  # padded to 576: the adapter must drop 64 logits
            "model.init_method_std=0.1",  # O(1) logits, so that scores differ between choices
            f"data.tokenizer_model={tokenizer}",
            "training.recompute_granularity=none",
        ],
    )


def _make_job(rank, world_size, out_dir, tokenizer):
    """A PolyNorm model, saved, exported, and scored by hand. Random weights from a fixed seed, with
    the norms and PolyCom scalars moved off their init. The output rows of SentencePiece's
    byte-fallback pieces are zeroed: their logit is then 0 while the max over the other pieces is
    well above, so greedy generations are valid text (a run of byte tokens that is not UTF-8
    decodes differently in SentencePiece and in the exported tokenizers-library tokenizer)."""
    import sentencepiece

    from dense_model.checkpoint import save_checkpoint
    from dense_model.export import export_hf
    from dense_model.model import build_model
    from dense_model.parallel import initialize_parallel

    seed = 1234  # fixed: a failure reproduces with the same weights
    initialize_parallel(1, 1, seed=seed)
    cfg = tiny_config(tokenizer)
    cfg.training.seed = seed
    model = build_model(cfg)
    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name or ".activation_func." in name:
                param.add_(0.3 * torch.randn(param.shape))
        model.output_layer.weight[[i for i in range(VOCAB) if sp.is_byte(i)]] = 0.0
    save_checkpoint(Path(out_dir) / "run" / "checkpoints", ITERATION, model, cfg)
    export_hf(Path(out_dir) / "run", Path(out_dir) / "hf", dtype="float32")
    _hand_answers(Path(out_dir))


# ------------------------------------------------------------------------------ by hand


def _logprobs(model, seq):
    """log-softmax [len(seq), vocab] of one unpadded sequence, fp32."""
    tokens = torch.tensor([seq])
    with torch.no_grad():
        logits = model(tokens, torch.arange(len(seq))[None], None)[0, :, :VOCAB]
    return torch.log_softmax(logits.float(), dim=-1)


def hand_loglikelihood(model, tok, context, continuation):
    # lm-eval's convention: trailing spaces of the context belong to the continuation, whose
    # tokens are those of context + continuation after the context's own tokens.
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = tok.encode(context)
    cont = tok.encode(context + continuation)[len(ctx) :]
    logprobs = _logprobs(model, (ctx + cont)[:-1])
    rows = logprobs[len(ctx) - 1 :]  # the rows that predict cont
    target = torch.tensor(cont)
    return float(rows.gather(-1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def hand_rolling(model, tok, text):
    """Every token predicted once, each chunk of SEQ targets with as much context as fits."""
    stream = [tok.eod] + tok.encode(text)  # position 0 is the EOD prefix, never predicted
    total = 0.0
    for first in range(1, len(stream), SEQ):
        end = min(first + SEQ, len(stream))  # targets stream[first:end]
        start = max(0, end - 1 - SEQ)  # input stream[start:end-1], at most SEQ tokens
        logprobs = _logprobs(model, stream[start : end - 1])
        for t in range(first, end):
            total += float(logprobs[t - start - 1, stream[t]])
    return total


def hand_generate(model, tok, context, until, max_new):
    stops = [s for s in [*until, tok.decode([tok.eod])] if s]  # SentencePiece decodes EOD to ""
    prompt = tok.encode(context)[-(SEQ - max_new) :]
    out: list[int] = []
    for _ in range(max_new):
        token = int(_logprobs(model, prompt + out)[-1].argmax())
        if token == tok.eod:
            break
        out.append(token)
        if any(s in tok.decode(out, skip_special_tokens=True) for s in stops):
            break
    text = tok.decode(out, skip_special_tokens=True)  # as lm-eval's hf model: no <unk>, <s>, </s>
    for stop in stops:
        text = text.split(stop)[0]
    return text


def _hand_answers(out_dir: Path) -> None:
    from dense_model.checkpoint.inference import load_model_for_inference

    loaded = load_model_for_inference(out_dir / "run")
    model, tok = loaded.model, loaded.tokenizer
    requests = shipped_requests()
    answers = {
        "loglikelihood": [hand_loglikelihood(model, tok, c, x) for c, x in requests["loglikelihood"]],
        "rolling": [hand_rolling(model, tok, t) for t in requests["rolling"]],
        "generate": [hand_generate(model, tok, c, u, n) for c, u, n in requests["generate"]],
        "generate_long": [hand_generate(model, tok, c, u, n) for c, u, n in long_generation_requests()],
    }
    (out_dir / "hand.json").write_text(json.dumps(answers))


def shipped_requests() -> dict:
    """The requests lm-eval makes for the three shipped tasks, written out from their YAML
    templates (test_adapter_equals_hand_computation checks them against lm-eval's logged ones)."""
    mc = [json.loads(line) for line in (TASK_DIR / "tiny_python_mc.jsonl").read_text().splitlines()]
    texts = [
        json.loads(line)["text"] for line in (TASK_DIR / "tiny_python_text.jsonl").read_text().splitlines()
    ]
    prompt = "Question: {}\nAnswer:".format
    return {
        "loglikelihood": [[prompt(d["question"]), " " + c] for d in mc for c in d["choices"]],
        "rolling": texts,
        "generate": [[prompt(d["question"]), ["\n", "Question:"], 8] for d in mc],
    }


def long_generation_requests() -> list:
    """Prompts from 1 to about 60 tokens (cut to 64 - max_gen_toks from the left) and generations of
    up to 40 tokens with no stop string: batches mix rows still reading their prompt with rows
    generating, over many KV-cache steps."""
    text = (TASK_DIR / "tiny_python_text.jsonl").read_text().splitlines()
    paragraph = " ".join(json.loads(line)["text"] for line in text)
    cuts = [1, 200, 9, 57, 3, 120, 31, 14, 80, 2]
    return [[paragraph[: cut * 3], [], 40 if i % 3 else 17] for i, cut in enumerate(cuts)]


def _adapter_job(rank, world_size, out_dir, requests_file):
    """Our lm-eval model at TP = world size, called with lm-eval Instances."""
    from lm_eval.api.instance import Instance

    from dense_model.evaluation import DenseModelLM

    lm = DenseModelLM(pretrained=str(Path(out_dir) / "run"), batch_size=3)
    requests = json.loads(Path(requests_file).read_text())

    def instances(kind, args):
        return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]

    answers = {
        "loglikelihood": lm.loglikelihood(
            instances("loglikelihood", [tuple(r) for r in requests["loglikelihood"]])
        ),
        "rolling": lm.loglikelihood_rolling(
            instances("loglikelihood_rolling", [(t,) for t in requests["rolling"]])
        ),
    }
    for kind in ("generate", "generate_long"):
        answers[kind] = lm.generate_until(
            instances("generate_until", [(c, {"until": u, "max_gen_toks": n}) for c, u, n in requests[kind]])
        )
    if rank == 0:
        Path(out_dir, f"adapter_tp{world_size}.json").write_text(json.dumps(answers))


# ------------------------------------------------------------------------------ fixtures


def run_cli(args, out: Path):
    return subprocess.run(
        ["bash", str(RUNNER), *map(str, args)],
        cwd=REPO,  # the tasks' data_files are relative to the repository root
        env=offline_env(out),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, spm_model):
    out = tmp_path_factory.mktemp("lm_eval")
    spawn_workers(_make_job, 1, str(out), spm_model)
    return out


def read_samples(folder: Path, task: str) -> list[dict]:
    (path,) = folder.rglob(f"samples_{task}_*.jsonl")
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


@pytest.fixture(scope="module")
def cli_run(checkpoint):
    """run_lm_eval.sh on the run directory, the three shipped tasks, samples logged."""
    out = checkpoint
    result = run_cli(
        [out / "run", ",".join(TASKS), "--include_path", "examples/lm_eval_tasks"]
        + ["--output_path", out / "evals", "--log_samples", "--batch_size", "4"],
        out,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (results_file,) = (out / "evals").rglob("results_*.json")
    samples = {task: read_samples(out / "evals", task) for task in TASKS}
    return result.stdout, json.loads(results_file.read_text()), samples


@pytest.fixture(scope="module")
def hand(checkpoint):
    return json.loads((checkpoint / "hand.json").read_text())


# ------------------------------------------------------------------------------ tests


@pytest.mark.slow
def test_cli_writes_results_and_prints_table(cli_run):
    stdout, results, samples = cli_run
    assert "tiny_python_mc" in stdout and "acc_norm" in stdout and "word_perplexity" in stdout
    mc = results["results"]["tiny_python_mc"]
    assert 0.0 <= mc["acc,none"] <= 1.0 and 0.0 <= mc["acc_norm,none"] <= 1.0
    assert results["results"]["tiny_python_ppl"]["word_perplexity,none"] > 1.0
    assert "exact_match,strip" in results["results"]["tiny_python_gen"]
    assert results["n-samples"]["tiny_python_mc"]["effective"] == 30
    config = results["config"]
    assert (config["dense_model_activation"], config["dense_model_iteration"]) == ("polynorm", ITERATION)
    assert config["dense_model_dtype"] == "float32"
    assert len(samples["tiny_python_ppl"]) == 6


@pytest.mark.slow
def test_adapter_equals_hand_computation(cli_run, hand):
    _, _, samples = cli_run
    requests = shipped_requests()
    args = [[a["arg_0"], a["arg_1"]] for s in samples["tiny_python_mc"] for a in s["arguments"].values()]
    assert args == requests["loglikelihood"]
    assert [s["arguments"]["gen_args_0"]["arg_0"] for s in samples["tiny_python_ppl"]] == requests["rolling"]
    gen = [s["arguments"]["gen_args_0"] for s in samples["tiny_python_gen"]]
    assert [[g["arg_0"], g["arg_1"]["until"], g["arg_1"]["max_gen_toks"]] for g in gen] == requests[
        "generate"
    ]
    ours = [r[0] for s in samples["tiny_python_mc"] for r in s["resps"]]  # [[logprob, is_greedy]]
    assert len(ours) == len(hand["loglikelihood"]) == 120
    for (score, greedy), (ref_score, ref_greedy) in zip(ours, hand["loglikelihood"]):
        assert abs(float(score) - ref_score) < 1e-4
        assert (greedy == "True") == ref_greedy
    assert len({round(float(s), 3) for s, _ in ours}) > 100  # a real spread of scores
    rolling = [float(s["resps"][0][0]) for s in samples["tiny_python_ppl"]]
    for score, ref in zip(rolling, hand["rolling"], strict=True):
        assert abs(score - ref) < 1e-4 * max(1.0, abs(ref)), (score, ref)
    generated = [r[0] for s in samples["tiny_python_gen"] for r in s["resps"]]
    assert generated == hand["generate"]


@pytest.mark.slow
def test_adapter_at_tp2_matches(checkpoint, hand):
    requests = shipped_requests()
    subset = {"loglikelihood": requests["loglikelihood"][:24], "rolling": requests["rolling"][:3]}
    subset["generate"] = requests["generate"][:6]
    subset["generate_long"] = long_generation_requests()
    small = checkpoint / "requests_tp2.json"
    small.write_text(json.dumps(subset))
    spawn_workers(_adapter_job, 2, str(checkpoint), str(small))
    tp2 = json.loads((checkpoint / "adapter_tp2.json").read_text())
    for (score, greedy), (ref, ref_greedy) in zip(
        tp2["loglikelihood"], hand["loglikelihood"][:24], strict=True
    ):
        assert abs(score - ref) < 1e-4 and greedy == ref_greedy
    for score, ref in zip(tp2["rolling"], hand["rolling"][:3], strict=True):
        assert abs(score - ref) < 1e-4 * max(1.0, abs(ref))
    assert tp2["generate"] == hand["generate"][:6]
    assert tp2["generate_long"] == hand["generate_long"]


@pytest.mark.slow
def test_kv_cache_generation_equals_recomputing(checkpoint, hand):
    """generate_until (megatron's KV cache, batches of 3 with unequal prompts) gives the tokens that
    re-running the whole sequence for each new token gives (hand_generate)."""
    requests = {
        "loglikelihood": [],
        "rolling": [],
        "generate": [],
        "generate_long": long_generation_requests(),
    }
    (checkpoint / "requests_long.json").write_text(json.dumps(requests))
    spawn_workers(_adapter_job, 1, str(checkpoint), str(checkpoint / "requests_long.json"))
    ours = json.loads((checkpoint / "adapter_tp1.json").read_text())["generate_long"]
    assert ours == hand["generate_long"]
    assert sum(len(t) for t in ours) > 200  # long generations, not early stops


@pytest.mark.slow
def test_hf_model_on_export_scores_the_same(checkpoint, cli_run, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    for key, value in offline_env(checkpoint).items():
        if key.startswith("HF_"):
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)
    _, ours, our_samples = cli_run
    theirs = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(checkpoint / "hf"), "dtype": "float32", "trust_remote_code": True},
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False),
        batch_size=4,
        device="cpu",
        log_samples=True,
    )
    for metric in ("acc,none", "acc_norm,none"):
        assert theirs["results"]["tiny_python_mc"][metric] == ours["results"]["tiny_python_mc"][metric]
    ppl_ours = ours["results"]["tiny_python_ppl"]["word_perplexity,none"]
    assert theirs["results"]["tiny_python_ppl"]["word_perplexity,none"] == pytest.approx(ppl_ours, rel=1e-4)

    hf_samples = {t: sorted(theirs["samples"][t], key=lambda s: s["doc_id"]) for t in TASKS}
    for a, b in zip(our_samples["tiny_python_mc"], hf_samples["tiny_python_mc"], strict=True):
        for (score, greedy), (hf_score, hf_greedy) in zip(
            [r[0] for r in a["resps"]], [r[0] for r in b["resps"]]
        ):
            assert abs(float(score) - float(hf_score)) < 1e-4
            assert (greedy == "True") == bool(hf_greedy)
    for a, b in zip(our_samples["tiny_python_ppl"], hf_samples["tiny_python_ppl"], strict=True):
        assert float(a["resps"][0][0]) == pytest.approx(float(b["resps"][0][0]), rel=1e-5, abs=1e-4)
    # Generations agree except where the model emits byte tokens that do not form UTF-8:
    # SentencePiece decodes the valid bytes of such a run, the tokenizers library's ByteFallback
    # decoder turns the whole run into U+FFFD (rare after the few training steps).
    gen = "exact_match,strip"
    assert theirs["results"]["tiny_python_gen"][gen] == ours["results"]["tiny_python_gen"][gen]
    compared = 0
    for a, b in zip(our_samples["tiny_python_gen"], hf_samples["tiny_python_gen"], strict=True):
        mine, hfs = a["resps"][0][0], b["resps"][0][0]
        if "\ufffd" not in mine + hfs:
            assert mine == hfs
            compared += 1
    assert compared >= 10


def test_clear_errors(tmp_path, capsys):
    missing = run_cli([tmp_path / "nope", "tiny_python_mc"], tmp_path)  # the real script: exit status 2
    assert missing.returncode == 2
    assert "checkpoint path" in missing.stderr and "does not exist" in missing.stderr

    from dense_model.evaluation.run import main

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    assert main([str(foreign), "tiny_python_mc"]) == 2
    assert "is not a dense_model checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_unknown_task_is_a_clear_error(checkpoint, capsys, monkeypatch):
    from dense_model.evaluation.run import main

    for key, value in offline_env(checkpoint).items():
        if key.startswith("HF_"):
            monkeypatch.setenv(key, value)  # main() only sets them when unset; monkeypatch restores
    monkeypatch.chdir(REPO)
    code = main([str(checkpoint / "run"), "tiny_python_mc,no_such_task_xyz", "--include_path", str(TASK_DIR)])
    assert code == 2
    err = capsys.readouterr().err
    assert "lm-eval does not know the task(s) no_such_task_xyz" in err


@pytest.mark.slow
def test_compare_evals_table(cli_run, checkpoint):
    _, results, _ = cli_run
    script = REPO / "scripts" / "compare_evals.py"
    out = subprocess.run(
        [sys.executable, str(script), str(checkpoint / "evals"), str(checkpoint / "evals"), "--stderr"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[0].startswith("| run | tiny_python_gen exact_match (strip) | tiny_python_mc acc_norm |")
    assert out[0].endswith("| avg |") and len(out) == 4  # header, rule, two runs
    acc_norm = 100 * results["results"]["tiny_python_mc"]["acc_norm,none"]
    assert out[2].startswith(f"| polynorm (iter {ITERATION}) |") and f"| {acc_norm:.1f} ± " in out[2]
    custom = subprocess.run(
        [
            sys.executable,
            str(script),
            str(checkpoint / "evals"),
            "--labels",
            "PolyNorm",
            "--metric",
            "tiny_python_mc=acc",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "tiny_python_mc acc |" in custom and "| PolyNorm |" in custom


def _dtype_job(rank, world_size, out_dir):
    """The adapter asked for bf16: megatron-core's config is built bf16 too (its attention then casts
    the fp32 softmax back to bf16), not an fp32 config over bf16 weights."""
    from dense_model.evaluation import DenseModelLM

    lm = DenseModelLM(pretrained=str(Path(out_dir) / "run"), dtype="bfloat16")
    config = lm.model.config
    scores = lm._loglikelihood_tokens([(("", ""), [5, 6, 7], [8, 9])])
    Path(out_dir, "dtype.json").write_text(
        json.dumps(
            {
                "bf16": config.bf16,
                "params_dtype": str(config.params_dtype),
                "weights": sorted({str(p.dtype) for p in lm.model.parameters()}),
                "score": scores[0][0],
            }
        )
    )


def test_adapter_builds_the_model_in_the_dtype_asked_for(checkpoint):
    spawn_workers(_dtype_job, 1, str(checkpoint))
    r = json.loads((checkpoint / "dtype.json").read_text())
    assert r["bf16"] and r["params_dtype"] == "torch.bfloat16" and r["weights"] == ["torch.bfloat16"]
    assert r["score"] < 0


def test_local_tasks_skip_indexing_the_built_in_ones():
    """Tasks all found under --include_path: lm-eval's run indexes that folder alone; a built-in
    name among them (or no --include_path) leaves lm-eval's full index in place."""
    import lm_eval.tasks

    from dense_model.evaluation.harness import _task_index_of

    full, folder = lm_eval.tasks.TaskManager, str(REPO / "examples/lm_eval_tasks")
    with _task_index_of(["tiny_python_mc,tiny_python_ppl"], folder):
        local = lm_eval.tasks.TaskManager(include_path=folder)
        assert {"tiny_python_mc", "tiny_python_ppl"} <= set(local.all_tasks)
        assert "hellaswag" not in local.all_tasks and len(local.all_tasks) < 10
    assert lm_eval.tasks.TaskManager is full
    for tasks, include in (("tiny_python_mc,hellaswag", folder), ("tiny_python_mc", None)):
        with _task_index_of(tasks, include):
            assert lm_eval.tasks.TaskManager is full
