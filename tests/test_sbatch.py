"""The sbatch scripts the tools write (a study's array, run_lm_eval.sh --every-checkpoint --slurm)
share one head, ``dense_model.sbatch.sbatch_header``: sbatch reads ``#SBATCH`` lines only above the
first command, so every option must come before it, in both scripts."""

from dense_model.evaluation.every import slurm_script as every_script
from dense_model.studies.runner import REPO
from dense_model.studies.runner import slurm_script as study_script
from dense_model.studies.spec import Study


def _options_sbatch_reads(script: str) -> list[str]:
    """The #SBATCH lines sbatch honours: those before the first line that is not a comment."""
    options = []
    for line in script.splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#SBATCH "):
            options.append(line.split(" ", 1)[1])
    return options


def test_every_option_is_read_by_sbatch_in_both_scripts(tmp_path, monkeypatch):
    monkeypatch.setenv("TP", "2")
    study = Study(
        path=tmp_path / "study.yaml",
        name="tiny",
        base_config=tmp_path / "base.yaml",
        activations=["gelu"],
        baseline="gelu",
        seeds=[1],
        seed_mode="both",
        fixed_seed=0,
        study_dir=tmp_path / "out",
        launch={"nnodes": 2, "gpus_per_node": 4},
        slurm={"time": "01:00:00", "partition": "gpu", "sbatch_args": ["--account=acme"]},
    )
    study_text = study_script(study)
    log_dir = study.study_dir.resolve() / "slurm"
    assert _options_sbatch_reads(study_text) == [
        "--job-name=study_tiny",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=4",
        "--time=01:00:00",
        "--signal=B:TERM@120",
        f"--output={log_dir}/%x-%A_%a.out",
        "--partition=gpu",
        "--account=acme",
    ]
    every_text = every_script([(tmp_path / "run", 3)], "hellaswag", ["--limit", "2"], tmp_path / "logs")
    assert _options_sbatch_reads(every_text) == [
        "--job-name=lm_eval_every",
        "--nodes=1",
        "--ntasks-per-node=1",
        "--gpus-per-node=2",  # TP
        f"--output={tmp_path / 'logs'}/%x-%A_%a.out",
    ]
    for text in (study_text, every_text):  # then the commands, from the repository
        lines = text.splitlines()
        first = 2 + len(_options_sbatch_reads(text))  # after the shebang, the comment and the options
        assert lines[first : first + 2] == ["set -euo pipefail", f"cd {REPO}"]
