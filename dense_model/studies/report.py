"""The study report: STUDY_DIR/report.md, report.json and report.png, from the runs' metrics.

Per run: final training loss (mean over the last log interval), validation loss and perplexity at
the final step (every run of a study trains the same number of tokens, checked here), parameters,
tokens, and lm-eval scores when the study has tasks. Per activation: mean and standard deviation
over seeds. Against the baseline: the paired difference over seeds with its 95% paired-t interval.
Runs that are not finished yet are listed and left out of the statistics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from dense_model.config import resolve_vocab_size
from dense_model.model import count_parameters
from dense_model.studies.runner import current_results, expected_steps, is_trained
from dense_model.studies.spec import Study, StudyRun
from dense_model.studies.stats import mean_std, paired_difference


def read_metrics(run_dir: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(train, valid) records by step; a resumed run appends, so the last record of a step wins."""
    train, valid = {}, {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return train, valid
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if "loss" in record:
            train[record["step"]] = record
        if "val_loss" in record:
            valid[record["step"]] = record
    return train, valid


def read_lm_eval(study: Study, run: StudyRun) -> dict[str, float]:
    """task -> its headline score (acc_norm, else acc, else the first number) from lm-eval's JSON
    (the results of the run's latest checkpoint with the study's tasks; see runner.current_results)."""
    scores = {}
    for results in current_results(study, run):
        for task, metrics in results.get("results", {}).items():
            numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
            for key in ("acc_norm,none", "acc,none", *numbers):
                if key in numbers:
                    scores[f"{task}/{key.split(',')[0]}"] = float(numbers[key])
                    break
    return scores


def collect_run(study: Study, run: StudyRun) -> dict:
    cfg = study.run_config(run)
    cfg.model.vocab_size = resolve_vocab_size(cfg)  # the tokenizer's, as the run's trainer resolves it
    steps = expected_steps(study, run)
    train, valid = read_metrics(run.run_dir)
    row = {
        "name": run.name,
        "activation": run.activation,
        "variant": run.variant,
        "seed": run.seed,
        "run_dir": str(run.run_dir),
        "params": count_parameters(cfg.model)["total"],
        "steps": steps,
        "finished": is_trained(study, run) and steps in train and steps in valid,
    }
    if row["finished"]:
        row.update(
            tokens=train[steps]["tokens"],
            train_loss=train[steps]["loss"],
            val_loss=valid[steps]["val_loss"],
            val_ppl=valid[steps]["val_ppl"],
            lm_eval=read_lm_eval(study, run),
        )
    return row


def build_report(study: Study) -> dict:
    rows = [collect_run(study, run) for run in study.runs()]
    done = [r for r in rows if r["finished"]]
    token_counts = sorted({r["tokens"] for r in done})
    groups = []
    for variant in list(study.variants) or [None]:
        by_act = {
            a: {r["seed"]: r for r in done if r["activation"] == a and r["variant"] == variant}
            for a in study.activations
        }
        summary = {}
        for act, seeds in by_act.items():
            if not seeds:
                continue
            entry = {"n": len(seeds)}
            for key in ("train_loss", "val_loss", "val_ppl"):
                entry[f"{key}_mean"], entry[f"{key}_std"] = mean_std([r[key] for r in seeds.values()])
            summary[act] = entry
        ranking = sorted(summary, key=lambda a: summary[a]["val_loss_mean"])
        base = by_act[study.baseline]
        comparisons = []
        for act in ranking:
            common = sorted(set(by_act[act]) & set(base))
            if act == study.baseline or not common:
                continue
            diff = paired_difference(
                [by_act[act][s]["val_loss"] for s in common], [base[s]["val_loss"] for s in common]
            )
            comparisons.append(
                {"activation": act, "baseline": study.baseline, "seeds": common, **diff.to_dict()}
            )
        neighbours = []  # is each rank better than the next one beyond seed noise?
        for better, worse in zip(ranking, ranking[1:]):
            common = sorted(set(by_act[better]) & set(by_act[worse]))
            if common:
                diff = paired_difference(
                    [by_act[better][s]["val_loss"] for s in common],
                    [by_act[worse][s]["val_loss"] for s in common],
                )
                neighbours.append({"better": better, "worse": worse, "seeds": common, **diff.to_dict()})
        groups.append(
            {
                "variant": variant,
                "summary": summary,
                "ranking": ranking,
                "vs_baseline": comparisons,
                "neighbours": neighbours,
            }
        )
    return {
        "study": study.name,
        "study_file": str(study.path),
        "seed_mode": study.seed_mode,
        "baseline": study.baseline,
        "ci": "95% paired t over seeds (difference of final validation loss, a - b)",
        "token_counts": token_counts,
        "runs": rows,
        "groups": groups,
    }


def _fmt(x, digits=4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def render_markdown(report: dict, study: Study) -> str:
    rows = report["runs"]
    tasks = sorted({t for r in rows if r["finished"] for t in r.get("lm_eval", {})})
    out = [
        f"# Study {report['study']}",
        "",
        f"Study file `{report['study_file']}`; seed mode `{report['seed_mode']}` "
        f"({len(study.seeds)} seeds x {len(study.activations)} activations"
        + (f" x {len(study.variants)} variants" if study.variants else "")
        + f"); baseline `{report['baseline']}`. Intervals: {report['ci']}.",
        "",
    ]
    if len(report["token_counts"]) > 1:
        out += [
            f"**Warning**: the finished runs stopped at different token counts {report['token_counts']}.",
            "",
        ]
    missing = [r["name"] for r in rows if not r["finished"]]
    if missing:
        out += [f"Not finished (left out below): {', '.join(missing)}.", ""]
    out += ["## Runs", ""]
    header = "| run | activation | seed | params | tokens | train loss | val loss | val ppl |"
    out += [header + "".join(f" {t} |" for t in tasks), "|" + "---|" * (8 + len(tasks))]
    for r in rows:
        if not r["finished"]:
            continue
        line = (
            f"| {r['name']} | {r['activation']} | {r['seed']} | {r['params']:,} | {r['tokens']:,} | "
            f"{_fmt(r['train_loss'])} | {_fmt(r['val_loss'])} | {_fmt(r['val_ppl'], 3)} |"
        )
        out.append(line + "".join(f" {_fmt(r['lm_eval'].get(t))} |" for t in tasks))
    for group in report["groups"]:
        title = f" (variant {group['variant']})" if group["variant"] else ""
        out += ["", f"## Per activation{title}", ""]
        out += [
            "| rank | activation | seeds | val loss mean ± std | val ppl mean ± std | train loss mean ± std |",
            "|---|---|---|---|---|---|",
        ]
        for i, act in enumerate(group["ranking"], 1):
            s = group["summary"][act]
            out.append(
                f"| {i} | {act} | {s['n']} | {_fmt(s['val_loss_mean'])} ± {_fmt(s['val_loss_std'])} | "
                f"{_fmt(s['val_ppl_mean'], 3)} ± {_fmt(s['val_ppl_std'], 3)} | "
                f"{_fmt(s['train_loss_mean'])} ± {_fmt(s['train_loss_std'])} |"
            )
        out += ["", f"### Paired difference in validation loss vs {report['baseline']}{title}", ""]
        out += _diff_table(group["vs_baseline"], "activation", "baseline")
        out += ["", f"### Each rank vs the next{title}", ""]
        out += _diff_table(group["neighbours"], "better", "worse")
    out += ["", "![curves](report.png)", ""]
    return "\n".join(out)


def _diff_table(items: list[dict], a: str, b: str) -> list[str]:
    if not items:
        return ["(no pairs with a common seed)"]
    lines = ["| a | b | seeds | mean (a - b) | 95% CI | p | CI excludes 0 |", "|---|---|---|---|---|---|---|"]
    for d in items:
        lines.append(
            f"| {d[a]} | {d[b]} | {d['n']} | {_fmt(d['mean'])} | [{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}] "
            f"| {_fmt(d['p_value'], 3)} | {'yes' if d['excludes_zero'] else 'no'} |"
        )
    return lines


def plot_curves(study: Study, report: dict, path: Path) -> None:
    """Training loss and validation perplexity against tokens: mean over seeds, band = min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(12, 4.5))
    runs = {run.name: run for run in study.runs()}
    finished = [r for r in report["runs"] if r["finished"]]
    arms = sorted({(r["activation"], r["variant"]) for r in finished}, key=str)
    for act, variant in arms:
        curves = [
            read_metrics(runs[r["name"]].run_dir)
            for r in finished
            if (r["activation"], r["variant"]) == (act, variant)
        ]
        label = f"{act} ({variant})" if variant else act
        for ax, which, key in ((ax_loss, 0, "loss"), (ax_ppl, 1, "val_ppl")):
            steps = sorted(set.intersection(*(set(c[which]) for c in curves)))
            if not steps:
                continue
            tokens = [curves[0][which][s]["tokens"] for s in steps]
            values = [[c[which][s][key] for c in curves] for s in steps]
            mean = [sum(v) / len(v) for v in values]
            (line,) = ax.plot(tokens, mean, "o-" if which else "-", label=f"{label} (n={len(curves)})", ms=3)
            ax.fill_between(
                tokens, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2
            )
    for ax, title in ((ax_loss, "training loss"), (ax_ppl, "validation perplexity")):
        ax.set_xlabel("tokens")
        ax.set_title(f"{title} (mean over seeds, band: min..max)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_ppl.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(study: Study) -> dict:
    """Write report.json, report.md and report.png into the study directory; returns the report."""
    study.study_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(study)
    (study.study_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (study.study_dir / "report.md").write_text(render_markdown(report, study))
    plot_curves(study, report, study.study_dir / "report.png")
    return report
