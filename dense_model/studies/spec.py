"""The study file: what to train, how often, and what to compare against.

    name: cpu_small
    base_config: ../demo.yaml         # relative to this file; every run starts from it
    overrides: [training.train_iters=300]   # applied to every run (the token budget lives here)
    activations: [polynorm, polyrelu, swiglu, gelu, relu]
    baseline: swiglu                  # paired differences are taken against it
    seeds: [1, 2, 3]
    seed_mode: init_and_data          # or init (data order fixed) or data (initialisation fixed)
    fixed_seed: 1234                  # the seed held fixed by seed_mode init / data
    variants: {lr1e-3: [training.lr=1e-3]}      # optional: a third grid axis of overrides
    activation_overrides: {polynorm: [...]}     # optional: per-activation overrides
    eval_tasks: [hellaswag]           # optional: lm-eval tasks scored on every final checkpoint
    eval_args: [--batch_size, "16"]   # optional: extra run_lm_eval.sh arguments
    launch: {gpus_per_node: 8, nnodes: 4}       # torchrun layout of one run
    slurm: {time: "72:00:00", partition: gpu, sbatch_args: [--account=x]}  # for --slurm
    study_dir: studies/cpu_small      # optional; default studies/NAME (relative to the cwd)

Each run is ``RUN_STUDY_DIR/runs/<activation>[_<variant>]_s<seed>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dense_model.config import ConfigError, load_config, read_yaml_mapping, validate

SEED_MODES = ("init_and_data", "init", "data")
KNOWN_KEYS = {
    "name",
    "base_config",
    "overrides",
    "activations",
    "baseline",
    "seeds",
    "seed_mode",
    "fixed_seed",
    "variants",
    "activation_overrides",
    "eval_tasks",
    "eval_args",
    "launch",
    "slurm",
    "study_dir",
}


@dataclass
class StudyRun:
    """One training run of the grid."""

    name: str
    activation: str
    seed: int
    variant: str | None
    run_dir: Path
    overrides: list[str]
    """Everything after the base config on run_pretrain.sh's command line."""


@dataclass
class Study:
    path: Path
    name: str
    base_config: Path
    activations: list[str]
    baseline: str
    seeds: list[int]
    seed_mode: str
    fixed_seed: int
    study_dir: Path
    overrides: list[str] = field(default_factory=list)
    variants: dict[str, list[str]] = field(default_factory=dict)
    activation_overrides: dict[str, list[str]] = field(default_factory=dict)
    eval_tasks: list[str] = field(default_factory=list)
    eval_args: list[str] = field(default_factory=list)
    launch: dict = field(default_factory=dict)
    slurm: dict = field(default_factory=dict)

    def seed_overrides(self, seed: int) -> list[str]:
        """training.seed (initialisation, dropout) and training.data_seed (data order) for a seed."""
        init_seed = seed if self.seed_mode in ("init_and_data", "init") else self.fixed_seed
        data_seed = seed if self.seed_mode in ("init_and_data", "data") else self.fixed_seed
        return [f"training.seed={init_seed}", f"training.data_seed={data_seed}"]

    def runs(self) -> list[StudyRun]:
        """The grid in a fixed order (variant, seed, activation): the array index of a run is stable."""
        out = []
        for variant in list(self.variants) or [None]:
            for seed in self.seeds:
                for activation in self.activations:
                    name = f"{activation}_{variant}_s{seed}" if variant else f"{activation}_s{seed}"
                    run_dir = self.study_dir / "runs" / name
                    overrides = (
                        list(self.overrides)
                        + list(self.variants.get(variant, []))
                        + list(self.activation_overrides.get(activation, []))
                        + [f"model.activation={activation}"]
                        + self.seed_overrides(seed)
                        + [f"run_dir={run_dir}"]
                    )
                    out.append(StudyRun(name, activation, seed, variant, run_dir, overrides))
        return out

    def run_config(self, run: StudyRun):
        """The run's full Config, as run_pretrain.sh will build it."""
        return load_config(self.base_config, run.overrides)


def _fail(path: Path, key: str, message: str):
    raise ConfigError(f"study file {path}: {key}: {message}")


def _str_list(path, data, key, default=None) -> list[str]:
    value = data.get(key, default if default is not None else [])
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        _fail(path, key, f"expected a list of strings, got {value!r}; write it as [a, b]")
    return [str(v) for v in value]


def _overrides_map(path, data, key) -> dict[str, list[str]]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        _fail(path, key, f"expected a mapping of name -> list of key=value overrides, got {value!r}")
    out = {}
    for name in value:
        out[str(name)] = _str_list(path, value, name)
        for item in out[str(name)]:
            if "=" not in item:
                _fail(path, f"{key}.{name}", f"{item!r} is not key=value (e.g. training.lr=1e-3)")
    return out


def load_study(path: str | Path, study_dir: str | Path | None = None) -> Study:
    """Read and check a study file; every run's config is loaded and validated up front."""
    path = Path(path)
    data = read_yaml_mapping(path, "study file", "(name:, activations:, ...)")
    unknown = sorted(set(data) - KNOWN_KEYS)
    if unknown:
        _fail(path, unknown[0], f"unknown key; valid keys: {', '.join(sorted(KNOWN_KEYS))}")
    for key in ("name", "base_config", "activations", "seeds"):
        if key not in data:
            _fail(path, key, "missing; see dense_model/studies/spec.py for a complete example")
    activations = _str_list(path, data, "activations")
    if len(set(activations)) != len(activations) or not activations:
        _fail(path, "activations", f"give each activation once, got {activations}")
    seeds = data["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        _fail(path, "seeds", f"expected a list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        _fail(path, "seeds", f"a seed appears twice in {seeds}")
    baseline = str(data.get("baseline", activations[0]))
    if baseline not in activations:
        _fail(path, "baseline", f"{baseline!r} is not one of the activations {activations}")
    seed_mode = data.get("seed_mode", "init_and_data")
    if seed_mode not in SEED_MODES:
        _fail(path, "seed_mode", f"{seed_mode!r} is not one of {list(SEED_MODES)}")
    fixed_seed = data.get("fixed_seed", 1234)
    if not isinstance(fixed_seed, int):
        _fail(path, "fixed_seed", f"expected an integer, got {fixed_seed!r}")
    base_config = (path.parent / str(data["base_config"])).resolve()
    if not base_config.is_file():
        _fail(path, "base_config", f"{base_config} does not exist (the path is relative to the study file)")
    for key in ("launch", "slurm"):
        if not isinstance(data.get(key) or {}, dict):
            _fail(path, key, f"expected a mapping, got {data[key]!r}")
    study = Study(
        path=path,
        name=str(data["name"]),
        base_config=base_config,
        activations=activations,
        baseline=baseline,
        seeds=list(seeds),
        seed_mode=seed_mode,
        fixed_seed=fixed_seed,
        study_dir=Path(study_dir or data.get("study_dir") or Path("studies") / str(data["name"])),
        overrides=_str_list(path, data, "overrides"),
        variants=_overrides_map(path, data, "variants"),
        activation_overrides=_overrides_map(path, data, "activation_overrides"),
        eval_tasks=_str_list(path, data, "eval_tasks"),
        eval_args=_str_list(path, data, "eval_args"),
        launch=dict(data.get("launch") or {}),
        slurm=dict(data.get("slurm") or {}),
    )
    for name in study.activation_overrides:
        if name not in activations:
            _fail(path, f"activation_overrides.{name}", f"not one of the activations {activations}")
    world = int(study.launch.get("nnodes", 1)) * int(study.launch.get("gpus_per_node", 1))
    for run in study.runs():
        try:
            validate(study.run_config(run), world_size=world)
        except ConfigError as err:
            raise ConfigError(f"study file {path}: run {run.name}: {err}") from None
    return study
