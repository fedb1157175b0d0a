"""Run an activation study (activations x seeds x variants) and write its report.

    python toolkits/studies/run_study.py configs/studies/cpu_small.yaml            # train here, then report
    python toolkits/studies/run_study.py configs/studies/1b_paper.yaml --slurm     # one SLURM array, report job after it
    python toolkits/studies/run_study.py STUDY.yaml --report-only                  # refresh the report
    python toolkits/studies/run_study.py STUDY.yaml --list                         # the runs and their state

Rerunning the command skips finished runs and resumes interrupted ones. The report (report.md,
report.json, report.png) is written into the study directory (``study_dir:`` in the file, else
studies/NAME; ``--study-dir`` overrides it). See dense_model/studies/spec.py for the file format.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable without installing the package


def main(argv=None) -> int:
    from dense_model.config import ConfigError
    from dense_model.studies import runner
    from dense_model.studies.report import write_report
    from dense_model.studies.spec import load_study

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="study YAML (configs/studies/)")
    parser.add_argument("--study-dir", help="where the runs and the report go (default: from the file)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--slurm", action="store_true", help="submit the unfinished runs as one SLURM job array"
    )
    mode.add_argument("--report-only", action="store_true", help="only (re)write the report")
    mode.add_argument("--list", action="store_true", help="print the runs, their state and array index")
    mode.add_argument("--task", type=int, help="run the run with this index (a SLURM array task)")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study, args.study_dir)
    except ConfigError as err:
        print(f"run_study: error: {err}", file=sys.stderr)
        return 2
    runs = study.runs()
    if args.list:
        for i, run in enumerate(runs):
            state = "finished" if runner.is_finished(study, run) else "to do"
            print(f"{i:4d}  {run.name:32s} {state:9s} {run.run_dir}")
        return 0
    if args.task is not None:
        if not 0 <= args.task < len(runs):
            print(
                f"run_study: error: --task {args.task}: the study has runs 0..{len(runs) - 1}",
                file=sys.stderr,
            )
            return 2
        return runner.run_one(study, runs[args.task], pick_port=False)
    if args.slurm:
        job = runner.submit_slurm(study)
        if job is None:
            print("every run is finished; writing the report")
        else:
            print(
                f"submitted array job {job} ({study.study_dir / 'study.sbatch'}); the report job runs after it"
            )
            return 0
    failed = [] if args.report_only or args.slurm else runner.run_sequential(study)
    report = write_report(study)
    done = sum(r["finished"] for r in report["runs"])
    print(f"report: {study.study_dir / 'report.md'} ({done}/{len(runs)} runs finished)")
    if failed:
        print(f"run_study: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
