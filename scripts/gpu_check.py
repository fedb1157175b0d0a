"""The prepared GPU check behind ``scripts/gpu_check.sh``: each part runs as the user would run it
(pytest, run_pretrain.sh, the lm-eval toolkit, the bench scripts), its log goes to OUT/logs/, and
OUT/gpu_check.json + OUT/gpu_check.md record what ran, how long, and what it showed.

Made for a short GPU loan: the parts run in order of value, each under a time cap (a part over its
cap is killed with its whole process tree and recorded as "timeout"), all of them within
``--budget`` seconds (default 420: the check and an install in 8 minutes on one H200; parts left
when it is spent are recorded as skipped), and the JSON and Markdown are rewritten before and after
every part, so a run cut off by the end of a loan still reports every part that ran (and the one
that was running). ``--parts`` picks a subset, ``--cap PART=SECONDS`` changes a cap.

Parts, in the order they run (``--cpu``: the ones a CPU can run, at tiny sizes; the others are
recorded as skipped), with their caps in seconds on a GPU (--cpu: ten times these):

  env            versions (torch, Triton, megatron-core, numpy), the GPU, nvidia-smi            10
  kernels        pytest tests/activations/kernels, compiled on CUDA (the new kernels' parity
                 at the 1B widths, TP=2, the sm_90 compile, the bench scripts' smoke runs) (GPU) 240
  bench_act      bench_activations.py at 8192 x 8256 with the launch sweep over 8256 and its TP
                 shard 4128 (--cpu: the interpreter smoke run)                                 200
  bench_step     bench_train_step.py on the 1B config, 4 layers: swiglu / polynorm fused /
                 unfused, SDPA, 30 interleaved steps each (--cpu: a 1-layer tiny model)        180
  optim_step     bench_optimizer_step.py on the 1B config, 4 layers: the optimizer step's share
                 of the step, megatron-core's fallback ops vs ours (--cpu: tiny model)          90
  demo_bf16      the demo in bf16 with the fused kernels (TE layers when TE imports), 40 steps (GPU) 90
  demo_fp32      the demo config in fp32 for 20 steps; its losses against the CPU's (GOLDEN_20;
                 --cpu: a smaller model and batch, GOLDEN_20_TINY)                              90
  kill_resume    the fp32 run SIGKILLed after its step-10 checkpoint, resumed: same losses     120
  moe_demo       the MoE demo (configs/moe/demo.yaml) in bf16 with the fused kernels, 20 steps (GPU) 90
  moe_step       bench_train_step.py on the paper's MoE shape (configs/moe/polynorm.yaml: 64
                 experts, top-8, width 2048) with 2 layers, EP=1, polynorm vs swiglu (GPU)      150
  moe_layer      bench_moe_experts.py layer: one MoE layer of the paper's shape (64 experts, top-8,
                 width 2048) in bf16, grouped (torch grouped_mm) vs sequential experts        (GPU) 120
  kernel_errors  scripts/kernel_errors.py: the compiled kernels' worst error vs the reference (GPU) 60
  lm_eval        the lm-eval model on the demo checkpoint, examples/lm_eval_tasks' tiny_python   90
  demo_golden    the whole demo (150 steps) in fp32, against the README test's CPU losses     (GPU) 150
  demo_tp2       the demo at TP=2 over NCCL, where the machine has 2 GPUs                  (GPU) 120
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

# No torch at module level, nor with --cpu at all: the parts import what they need in their own
# processes, and a bad argument is refused at once (torch alone is ~2.5 s of CPU to import).
from dense_model.benchmarking import markdown_table, metadata_lines, run_metadata, write_json  # noqa: E402
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


CAPS = {  # seconds per part; the order of this dict is the order the parts run in
    "env": 10,
    "kernels": 240,
    "bench_act": 200,
    "bench_step": 180,
    "optim_step": 90,
    "demo_bf16": 90,
    "demo_fp32": 90,
    "kill_resume": 120,
    "moe_demo": 90,
    "moe_step": 150,
    "moe_layer": 120,
    "kernel_errors": 60,
    "lm_eval": 90,
    "demo_golden": 150,
    "demo_tp2": 120,
}


def script(name: str, json_path: Path, *first: str) -> list[str]:
    """The command of scripts/NAME (with ``first`` arguments before the rest) writing JSON_PATH."""
    return [sys.executable, f"scripts/{name}", *first, "--json", str(json_path)]


class Check:
    def __init__(self, out: Path, cpu: bool, caps: dict, budget: float, wanted: set):
        self.out, self.cpu, self.parts = out, cpu, {}
        self.caps, self.budget, self.wanted = caps, budget, wanted
        self.started = time.perf_counter()
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
        self.env["HF_DATASETS_OFFLINE"] = "1"
        self.env["GPUS_PER_NODE"] = (
            "1"  # one process (run_pretrain.sh takes every GPU otherwise); TP=2 sets 2
        )
        self.meta = run_metadata(cpu_only=cpu, mode="cpu" if cpu else "gpu", budget_s=budget, caps=caps)

    def wants(self, name: str) -> bool:
        """Whether part ``name`` is to run (selected, and budget left); records the skip if not."""
        if name not in self.wanted:
            return False
        left = self.budget - (time.perf_counter() - self.started)
        if left < 1:
            self.skip(name, f"budget of {self.budget:.0f} s spent")
            return False
        return True

    def run(self, name: str, cmd: list[str], env: dict | None = None, **result) -> bool:
        """Run ``cmd`` in the repo with its output in logs/NAME.log, under the part's cap (and the
        budget left); record status and seconds. A part over its cap: its process tree is killed."""
        cap = min(self.caps[name], max(1.0, self.budget - (time.perf_counter() - self.started)))
        self.record(name, "running", cap_s=cap)
        start = time.perf_counter()
        with open(self.out / "logs" / f"{name}.log", "w") as log:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env={**self.env, **(env or {})}, stdout=log, stderr=log, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=cap)
                status = "ok" if rc == 0 else f"failed (rc {rc})"
            except subprocess.TimeoutExpired:
                kill_process_tree(proc.pid)
                proc.wait()
                status = f"timeout (cap {cap:.0f} s)"
        self.record(name, status, time.perf_counter() - start, cap_s=cap, **result)
        return status == "ok"

    def record(self, name: str, status: str, seconds: float = 0.0, **result) -> None:
        self.parts[name] = {"status": status, "seconds": round(seconds, 1), **result}
        if status != "running":
            print(f"gpu_check: {name}: {status} ({seconds:.0f} s)", flush=True)
        self.write()

    def update(self, name: str, **result) -> None:
        self.parts[name].update(result)
        self.write()

    def skip(self, name: str, why: str) -> None:
        self.record(name, f"skipped: {why}")

    def ok(self) -> bool:
        return all(p["status"] == "ok" or p["status"].startswith("skipped") for p in self.parts.values())

    def write(self, finished: bool = False) -> str:
        """gpu_check.json and gpu_check.md as they stand (after every part: a cut-off run keeps them)."""
        blob = {"meta": self.meta, "ok": self.ok(), "finished": finished, "parts": self.parts}
        write_json(str(self.out / "gpu_check.json"), blob)
        rows = [[name, part["status"], part["seconds"], _details(part)] for name, part in self.parts.items()]
        summary = [
            metadata_lines(self.meta),
            "",
            markdown_table(["part", "status", "seconds", "details"], rows),
        ]
        if not finished:
            summary += ["", "**Not finished** (cut off, or still running)."]
        logs = {
            "bench_activations": "bench_act",
            "bench_train_step": "bench_step",
            "bench_optimizer_step": "optim_step",
            "bench_moe_step": "moe_step",
        }
        for name, log in logs.items():
            if (self.out / f"{name}.json").exists():
                summary += ["", f"Details: `{name}.json`, log `logs/{log}.log`"]
        text = "\n".join(summary) + "\n"
        (self.out / "gpu_check.md").write_text(text)
        return text


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


ENV_SCRIPT = """
import importlib.metadata as md, json, torch
def v(p):
    try:
        return md.version(p)
    except md.PackageNotFoundError:
        return None
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    **{p: v(p) for p in ("triton", "megatron-core", "numpy", "transformer-engine", "apex", "liger-kernel")}}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="only the parts a CPU can run, at tiny sizes")
    p.add_argument("--out", default="gpu_check_out", help="output folder (default: %(default)s)")
    p.add_argument(
        "--budget", type=float, default=None, help="seconds for all parts (default 420; --cpu: 4200)"
    )
    p.add_argument("--parts", default=None, help=f"comma-separated subset of {','.join(CAPS)}")
    p.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS", help="a part's time cap")
    args = p.parse_args(argv)

    # The caps are sized for an H200; the CPU parts are tiny but a CPU is slow: ten times as long.
    caps = {name: cap * (10 if args.cpu else 1) for name, cap in CAPS.items()}
    budget = args.budget or (4200.0 if args.cpu else 420.0)
    for item in args.cap:
        name, _, seconds = item.partition("=")
        if name not in CAPS or not seconds.replace(".", "", 1).isdigit():
            print(
                f"gpu_check: --cap {item!r}: write PART=SECONDS with PART one of {', '.join(CAPS)}",
                file=sys.stderr,
            )
            return 2
        caps[name] = float(seconds)
    wanted = set(CAPS) if args.parts is None else set(args.parts.split(","))
    if wanted - set(CAPS):
        print(
            f"gpu_check: --parts: unknown {sorted(wanted - set(CAPS))}; choose from {', '.join(CAPS)}",
            file=sys.stderr,
        )
        return 2
    cpu = args.cpu
    if not cpu:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; run with --cpu for the CPU parts", file=sys.stderr)
            return 2
    out = Path(args.out).resolve()
    check = Check(out, cpu, caps, budget, wanted)
    gpus = 0 if cpu else torch.cuda.device_count()
    check.meta["gpus"] = gpus
    runs = out / "runs"
    cpu_env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"} if cpu else {}
    check.env.update(cpu_env)
    fp32 = runs / "fp32"
    fp32_overrides = ["training.bf16=false", *(CPU_TINY if cpu else [])]
    te = []  # the GPU demo's layers: TE's where it imports
    if not cpu:
        from dense_model.backends import installed_kernels

        te = ["model.transformer_impl=transformer_engine"] if installed_kernels().transformer_engine else []

    if check.wants("env"):
        env_log = out / "logs" / "env.log"
        if check.run("env", [sys.executable, "-c", ENV_SCRIPT]):
            check.update("env", **json.loads(env_log.read_text().strip().splitlines()[-1]))
            if not cpu:
                try:
                    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
                    (out / "logs" / "nvidia-smi.log").write_text(smi.stdout + smi.stderr)
                except (OSError, subprocess.SubprocessError) as err:
                    check.update("env", nvidia_smi=f"not run: {err}")

    if check.wants("kernels"):
        if cpu:
            check.skip("kernels", "GPU only (the CPU test suite runs them under TRITON_INTERPRET=1)")
        else:  # -rA: every test's outcome and the output of failures in the log
            check.run("kernels", [sys.executable, "-m", "pytest", "-q", "-rA", "tests/activations/kernels"])

    if check.wants("bench_act"):
        bench = script("bench_activations.py", out / "bench_activations.json")
        # The sweep at 8256 and its TP=2 shard here (the whole sweep: docs/benchmarks.md's owed list).
        bench += ["--device", "cpu", "--sweep"] if cpu else ["--tokens", "8192", "--ffn", "8256", "--sweep"]
        bench += [] if cpu else ["--sweep-widths", "8256,4128"]
        check.run("bench_act", bench)

    if check.wants("bench_step"):
        step = script("bench_train_step.py", out / "bench_train_step.json")
        step += ["--runs", "swiglu:na,polynorm:on,polynorm:off"]
        if cpu:
            step += ["--device", "cpu", "--warmup", "1", "--steps", "2", "--attention", "local,sdpa"]
            step += ["model.num_layers=1"]
        else:
            step += ["--config", "configs/1b/polynorm.yaml", "--num-layers", "4", "--attention", "sdpa"]
            step += ["--fit-layers"]
        check.run("bench_step", step)

    if check.wants("optim_step"):
        optim = script("bench_optimizer_step.py", out / "bench_optimizer_step.json")
        if cpu:
            optim += ["--device", "cpu", "--warmup", "1", "--steps", "2"]
        else:
            optim += ["--config", "configs/1b/polynorm.yaml", "model.num_layers=4"]
        if check.run("optim_step", optim):
            rows = json.loads((out / "bench_optimizer_step.json").read_text())["results"]
            check.update(
                "optim_step",
                **{
                    f"{ops}_{k}": row[k]
                    for ops, row in rows.items()
                    for k in ("host_reads_per_optimizer_step", "step_ms")
                }
                | {
                    f"{ops}_optimizer_share": row["optimizer_ms"] / row["step_ms"]
                    for ops, row in rows.items()
                },
            )

    if check.wants("demo_bf16"):
        if cpu:
            check.skip("demo_bf16", "GPU only")
        else:
            bf16 = runs / "bf16"
            overrides = ["training.bf16=true", "model.fused_activation=true", "training.train_iters=40", *te]
            if check.run("demo_bf16", pretrain(bf16, *overrides)):
                trained = losses(bf16)
                check.update("demo_bf16", loss_first=trained[1], loss_last=trained[max(trained)], te=bool(te))

    if check.wants("demo_fp32") and check.run("demo_fp32", pretrain(fp32, *fp32_overrides)):
        check.update("demo_fp32", **against_golden(losses(fp32), GOLDEN_20_TINY if cpu else GOLDEN_20))

    if check.wants("kill_resume"):
        resumed = runs / "resume"
        start = time.perf_counter()
        how = kill_after_checkpoint(
            check, pretrain(resumed, *fp32_overrides), resumed / "checkpoints" / "iter_0000010"
        )
        if (
            check.run("kill_resume", pretrain(resumed, *fp32_overrides), kill=how)
            and check.parts.get("demo_fp32", {}).get("status") == "ok"
        ):
            want, got = losses(fp32), losses(resumed)
            diff = max(abs(got[s] - want[s]) for s in range(11, 21))
            check.update(
                "kill_resume", seconds=round(time.perf_counter() - start, 1), max_loss_diff_steps_11_20=diff
            )

    if check.wants("moe_demo"):
        if cpu:
            check.skip("moe_demo", "GPU only (the CPU test suite trains the MoE demo)")
        else:
            moe = runs / "moe_bf16"
            cmd = ["bash", "run_pretrain.sh", "configs/moe/demo.yaml", f"run_dir={moe}", "training.bf16=true"]
            cmd += ["model.fused_activation=true", "training.train_iters=20", "logging.log_interval=1"]
            cmd += ["logging.eval_interval=1000", "checkpoint.save_interval=1000"]
            if check.run("moe_demo", cmd):
                trained = losses(moe)
                check.update("moe_demo", loss_first=trained[1], loss_last=trained[max(trained)])

    if check.wants("moe_step"):
        if cpu:
            check.skip("moe_step", "GPU only")
        else:
            step = script("bench_train_step.py", out / "bench_moe_step.json")
            step += [
                "--config",
                "configs/moe/polynorm.yaml",
                "--num-layers",
                "2",
                "--runs",
                "swiglu:na,polynorm:on",
            ]
            step += [
                "--attention",
                "sdpa",
                "--steps",
                "10",
                "--fit-layers",
                "parallel.expert_model_parallel_size=1",
            ]
            check.run("moe_step", step)

    if check.wants("moe_layer"):
        if cpu:
            check.skip("moe_layer", "GPU only (the CPU figure: bench_moe_experts.py demo)")
        else:
            check.run("moe_layer", script("bench_moe_experts.py", out / "bench_moe_layer.json", "layer"))

    if check.wants("kernel_errors"):
        if cpu:
            check.skip("kernel_errors", "GPU only (the CPU table: scripts/kernel_errors.py --device cpu)")
        else:
            errors = out / "kernel_errors.json"  # the compiled kernels' row of docs/benchmarks.md's table
            cmd = [sys.executable, "scripts/kernel_errors.py", "--dtypes", "fp32,bf16", "--json", str(errors)]
            if check.run("kernel_errors", cmd):
                check.update("kernel_errors", **json.loads(errors.read_text())["errors"])

    if check.wants("lm_eval"):
        if (fp32 / "checkpoints").exists():
            lm_eval = ["bash", "toolkits/evaluation/run_lm_eval.sh", str(fp32), "tiny_python"]
            lm_eval += ["--include_path", "examples/lm_eval_tasks", "--output_path", str(out / "lm_eval")]
            check.run("lm_eval", lm_eval + (["--limit", "4"] if cpu else []))
        else:
            check.skip("lm_eval", "needs demo_fp32's checkpoint")

    if check.wants("demo_golden"):
        if cpu:
            check.skip("demo_golden", "GPU only (150 steps; the CPU test suite runs it)")
        else:
            golden = runs / "golden"
            demo = ["bash", "run_pretrain.sh", f"run_dir={golden}", "training.bf16=false"]
            if check.run("demo_golden", demo + ["checkpoint.save_interval=1000"]):
                check.update("demo_golden", **against_golden(losses(golden), GOLDEN_150))

    if check.wants("demo_tp2"):
        if gpus >= 2:
            tp2 = runs / "tp2"
            cmd = pretrain(tp2, "parallel.tensor_model_parallel_size=2")
            if check.run("demo_tp2", cmd, {"GPUS_PER_NODE": "2"}):
                check.update("demo_tp2", loss_step10=losses(tp2)[10])
        else:
            check.skip("demo_tp2", "needs 2 GPUs")

    print(check.write(finished=True))
    return 0 if check.ok() else 1


def _details(part: dict) -> str:
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in part.items()
        if k not in ("status", "seconds")
    )


if __name__ == "__main__":
    sys.exit(main())
