"""The prepared GPU check behind ``scripts/gpu_check.sh``: each part runs as the user would run it
(pytest, run_pretrain.sh, the lm-eval toolkit, the bench scripts), its log goes to OUT/logs/, and
OUT/gpu_check.json + OUT/gpu_check.md record what ran, how long, and what it showed.

Parts (``--cpu``: the ones a CPU can run, at tiny sizes; the others are recorded as skipped):

  kernels        pytest tests/activations/kernels, compiled on CUDA                       (GPU)
  kernel_errors  scripts/kernel_errors.py: the compiled kernels' worst error vs the reference (GPU)
  demo_fp32      the demo config in fp32 for 20 steps; its losses against the CPU's (GOLDEN_20;
                 --cpu: a smaller model and batch, GOLDEN_20_TINY)
  demo_golden    the whole demo (150 steps) in fp32, against the README test's CPU losses     (GPU)
  demo_bf16      the demo in bf16 with the fused kernels (TE layers when TE imports), 40 steps (GPU)
  demo_tp2       the demo at TP=2 over NCCL, where the machine has 2 GPUs                  (GPU)
  kill_resume    the fp32 run SIGKILLed after its step-10 checkpoint, resumed: same losses
  lm_eval        the lm-eval model on the demo checkpoint, examples/lm_eval_tasks' tiny_python
  bench_act      bench_activations.py at 8192 x 8256 (--cpu: the interpreter smoke run)
  bench_step     bench_train_step.py on the 1B config, 4 layers: swiglu / polynorm fused / unfused,
                 local vs sdpa attention (--cpu: a 1-layer tiny model)
  optim_step     bench_optimizer_step.py on the 1B config, 4 layers: the optimizer step's share of
                 the step and its host reads, megatron-core's fallback ops vs ours (--cpu: tiny model)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dense_model.benchmarking import markdown_table, metadata_lines, run_metadata, write_json  # noqa: E402
from dense_model.model import installed_kernels  # noqa: E402
from dense_model.procutil import kill_process_tree  # noqa: E402

# The demo's fp32 losses on the CPU. The data order depends on train_iters (megatron-core's dataset
# draws train_iters x global batch samples), so each golden belongs to its run length:
GOLDEN_150 = {10: 7.7168519, 50: 5.5120012, 100: 4.8251246, 150: 4.5540005}  # tests/test_run_pretrain_demo.py
GOLDEN_20 = {10: 7.115847110748291, 20: 6.199575424194336}  # bash run_pretrain.sh + DEMO, on the CPU
# --cpu shrinks the demo's model and batch to finish in seconds (its golden: measured like GOLDEN_20).
CPU_TINY = ["model.num_layers=2", "model.hidden_size=64", "model.swiglu_ffn_hidden_size=96"]
CPU_TINY += ["training.micro_batch_size=4", "training.global_batch_size=8"]
GOLDEN_20_TINY = {10: 8.030385971069336, 20: 7.393928527832031}
DEMO = ["training.train_iters=20", "logging.log_interval=1", "checkpoint.save_interval=10"]
DEMO += ["logging.eval_interval=1000", "checkpoint.keep_last=3"]


class Check:
    def __init__(self, out: Path, cpu: bool):
        self.out, self.cpu, self.parts = out, cpu, {}
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
        self.env["HF_DATASETS_OFFLINE"] = "1"
        self.env["GPUS_PER_NODE"] = (
            "1"  # one process (run_pretrain.sh takes every GPU otherwise); TP=2 sets 2
        )

    def run(self, name: str, cmd: list[str], env: dict | None = None, **result) -> bool:
        """Run ``cmd`` in the repo with its output in logs/NAME.log; record status and seconds."""
        start = time.perf_counter()
        with open(self.out / "logs" / f"{name}.log", "w") as log:
            rc = subprocess.run(
                cmd, cwd=REPO, env={**self.env, **(env or {})}, stdout=log, stderr=log
            ).returncode
        self.record(name, "ok" if rc == 0 else f"failed (rc {rc})", time.perf_counter() - start, **result)
        return rc == 0

    def record(self, name: str, status: str, seconds: float = 0.0, **result) -> None:
        self.parts[name] = {"status": status, "seconds": round(seconds, 1), **result}
        print(f"gpu_check: {name}: {status} ({seconds:.0f} s)", flush=True)

    def skip(self, name: str, why: str) -> None:
        self.record(name, f"skipped: {why}")


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss by step (the last record of a step wins: a resumed run repeats steps)."""
    by_step = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            by_step[record["step"]] = record["loss"]
    return by_step


def against_golden(got: dict[int, float], golden: dict[int, float]) -> dict:
    """The largest relative loss difference from ``golden`` and the losses it was taken over."""
    rel = max(abs(got[step] - loss) / loss for step, loss in golden.items())
    return {"max_rel_diff_vs_cpu": rel, "losses": {step: got[step] for step in golden}}


def pretrain(run_dir: Path, *overrides: str) -> list[str]:
    return ["bash", "run_pretrain.sh", f"run_dir={run_dir}", *DEMO, *overrides]


def kill_after_checkpoint(check: Check, cmd: list[str], checkpoint: Path) -> str:
    """Start ``cmd``, SIGKILL its whole process tree (torchrun's workers have sessions of their own)
    once ``checkpoint`` exists; "killed", or "finished before the kill"."""
    with open(check.out / "logs" / "kill_resume_killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=check.env, stdout=log, stderr=log, start_new_session=True)
        while not checkpoint.exists() and proc.poll() is None:
            time.sleep(0.2)
        if proc.poll() is not None:
            return "finished before the kill"
        kill_process_tree(proc.pid)
        proc.wait()
        return "killed"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="only the parts a CPU can run, at tiny sizes")
    p.add_argument("--out", default="gpu_check_out", help="output folder (default: %(default)s)")
    args = p.parse_args(argv)
    import torch

    cpu = args.cpu
    if not cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --cpu for the CPU parts", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    check = Check(out, cpu)
    gpus = 0 if cpu else torch.cuda.device_count()
    runs = out / "runs"
    cpu_env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"} if cpu else {}
    check.env.update(cpu_env)

    if cpu:
        check.skip("kernels", "GPU only (the CPU test suite runs them under TRITON_INTERPRET=1)")
        check.skip("kernel_errors", "GPU only (the CPU table: scripts/kernel_errors.py --device cpu)")
    else:
        check.run("kernels", [sys.executable, "-m", "pytest", "-q", "tests/activations/kernels"])
        errors = out / "kernel_errors.json"  # the compiled kernels' row of docs/benchmarks.md's error table
        kernel_errors = [
            sys.executable,
            "scripts/kernel_errors.py",
            "--dtypes",
            "fp32,bf16",
            "--json",
            str(errors),
        ]
        if check.run("kernel_errors", kernel_errors):
            check.parts["kernel_errors"].update(json.loads(errors.read_text())["errors"])

    fp32 = runs / "fp32"
    fp32_overrides = ["training.bf16=false", *(CPU_TINY if cpu else [])]
    if check.run("demo_fp32", pretrain(fp32, *fp32_overrides)):
        check.parts["demo_fp32"].update(against_golden(losses(fp32), GOLDEN_20_TINY if cpu else GOLDEN_20))
    if cpu:
        check.skip("demo_golden", "GPU only (150 steps; the CPU test suite runs it)")
    else:
        golden = runs / "golden"
        demo = [
            "bash",
            "run_pretrain.sh",
            f"run_dir={golden}",
            "training.bf16=false",
            "checkpoint.save_interval=1000",
        ]
        if check.run("demo_golden", demo):
            check.parts["demo_golden"].update(against_golden(losses(golden), GOLDEN_150))

    if cpu:
        check.skip("demo_bf16", "GPU only")
    else:
        te = ["model.transformer_impl=transformer_engine"] if installed_kernels().transformer_engine else []
        bf16 = runs / "bf16"
        if check.run(
            "demo_bf16",
            pretrain(
                bf16, "training.bf16=true", "model.fused_activation=true", "training.train_iters=40", *te
            ),
        ):
            trained = losses(bf16)
            check.parts["demo_bf16"].update(
                loss_first=trained[1], loss_last=trained[max(trained)], te=bool(te)
            )

    if gpus >= 2:
        tp2 = runs / "tp2"
        if check.run(
            "demo_tp2", pretrain(tp2, "parallel.tensor_model_parallel_size=2"), {"GPUS_PER_NODE": "2"}
        ):
            check.parts["demo_tp2"]["loss_step10"] = losses(tp2)[10]
    else:
        check.skip("demo_tp2", "needs 2 GPUs")

    resumed = runs / "resume"
    start = time.perf_counter()
    how = kill_after_checkpoint(
        check, pretrain(resumed, *fp32_overrides), resumed / "checkpoints" / "iter_0000010"
    )
    if check.run("kill_resume", pretrain(resumed, *fp32_overrides), kill=how) and "demo_fp32" in check.parts:
        want, got = losses(fp32), losses(resumed)
        diff = max(abs(got[s] - want[s]) for s in range(11, 21))
        check.parts["kill_resume"].update(
            seconds=round(time.perf_counter() - start, 1), max_loss_diff_steps_11_20=diff
        )

    lm_eval = ["bash", "toolkits/evaluation/run_lm_eval.sh", str(fp32), "tiny_python"]
    lm_eval += ["--include_path", "examples/lm_eval_tasks", "--output_path", str(out / "lm_eval")]
    check.run("lm_eval", lm_eval + (["--limit", "4"] if cpu else []))

    bench = [sys.executable, "scripts/bench_activations.py", "--json", str(out / "bench_activations.json")]
    check.run("bench_act", bench + (["--device", "cpu"] if cpu else ["--tokens", "8192", "--ffn", "8256"]))

    step = [sys.executable, "scripts/bench_train_step.py", "--json", str(out / "bench_train_step.json")]
    step += ["--runs", "swiglu:na,polynorm:on,polynorm:off", "--attention", "local,sdpa"]
    if cpu:
        step += ["--device", "cpu", "--warmup", "0", "--steps", "1", "--no-isolate", "model.num_layers=1"]
    else:
        step += ["--config", "configs/1b/polynorm.yaml", "--num-layers", "4", "--fit-layers"]
    check.run("bench_step", step)

    optim = [
        sys.executable,
        "scripts/bench_optimizer_step.py",
        "--json",
        str(out / "bench_optimizer_step.json"),
    ]
    if cpu:
        optim += ["--device", "cpu", "--warmup", "1", "--steps", "2"]
    else:
        optim += ["--config", "configs/1b/polynorm.yaml", "model.num_layers=4"]
    if check.run("optim_step", optim):
        rows = json.loads((out / "bench_optimizer_step.json").read_text())["results"]
        check.parts["optim_step"].update(
            {
                f"{ops}_{k}": row[k]
                for ops, row in rows.items()
                for k in ("host_reads_per_optimizer_step", "step_ms")
            }
            | {f"{ops}_optimizer_share": row["optimizer_ms"] / row["step_ms"] for ops, row in rows.items()}
        )

    meta = run_metadata(mode="cpu" if cpu else "gpu", gpus=gpus)
    ok = all(part["status"] == "ok" or part["status"].startswith("skipped") for part in check.parts.values())
    write_json(str(out / "gpu_check.json"), {"meta": meta, "ok": ok, "parts": check.parts})
    rows = [[name, part["status"], part["seconds"], _details(part)] for name, part in check.parts.items()]
    summary = [metadata_lines(meta), "", markdown_table(["part", "status", "seconds", "details"], rows)]
    logs = {
        "bench_activations": "bench_act",
        "bench_train_step": "bench_step",
        "bench_optimizer_step": "optim_step",
    }
    for name, log in logs.items():
        if (out / f"{name}.json").exists():
            summary += ["", f"Details: `{name}.json`, log `logs/{log}.log`"]
    (out / "gpu_check.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    return 0 if ok else 1


def _details(part: dict) -> str:
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in part.items()
        if k not in ("status", "seconds")
    )


if __name__ == "__main__":
    sys.exit(main())
