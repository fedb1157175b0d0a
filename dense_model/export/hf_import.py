"""Import a Hugging Face model folder into a run directory that trains and evaluates at any TP/PP.

    python toolkits/checkpoint_conversion/import_hf.py HF_DIR OUT_RUN_DIR [--dtype auto] [--dry-run] [--overwrite]

writes

    OUT_RUN_DIR/config.yaml                         a complete run config: the model section from
                                                    HF_DIR/config.json, the tokenizer, run_dir and
                                                    checkpoint.load = OUT_RUN_DIR (data: yours to set)
    OUT_RUN_DIR/tokenizer/ (or tokenizer.model)     HF_DIR's tokenizer files
    OUT_RUN_DIR/checkpoints/iter_0000000/           the model's weights, weights only, in the
                                                    dist_checkpointing format training writes
    OUT_RUN_DIR/checkpoints/latest_checkpointed_iteration.txt   "0"

so that ``run_lm_eval.sh OUT_RUN_DIR TASKS`` scores it at any TP and ``run_pretrain.sh
OUT_RUN_DIR/config.yaml run_dir=NEW data.blend=...`` trains from it (step 0, fresh optimizer).

What it reads is a table keyed on ``architectures`` (``LAYOUTS``): each entry turns the Hugging
Face config into our model section, refusing with one line naming the field whatever our model
cannot reproduce exactly (RoPE scaling, a sliding window shorter than the sequence, biases, other
activations, a head_dim other than hidden/heads). The tensors follow the weight table shared with
the export (``mapping.weight_rules``, read backwards). Every tensor of HF_DIR must be placed and
every parameter of ours filled, shapes checked, before anything is written; ``--dry-run`` prints
the mapping and the config, lists the unmatched tensors, and exits 2 if there are any.

Memory: the model is built once in the target dtype, uninitialised, and filled tensor by tensor:
a safetensors tensor is read with pread(2) (nothing mapped), a
``pytorch_model.bin`` is memory-mapped and released as soon as its last tensor is read. The peak is
about one copy of the model plus the largest file's pages for .bin (docs/evaluation.md has the
measured figure).

The output is written into a fresh folder next to OUT_RUN_DIR and renamed into place at the end
(``dense_model.fsreplace``), so a failed import leaves nothing half-written. A non-empty
OUT_RUN_DIR is replaced only with ``--overwrite``, and then only if it holds no run: an earlier
import (its ``imported_from.json``) that nobody trained in is replaced, a run that trained (metrics,
a newer checkpoint, a lock) or a folder holding runs is refused. OUT_RUN_DIR may not be or hold
HF_DIR (compared by device and inode, not by name).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dense_model.checkpoint.layout import (
    CHECKPOINTS,
    METADATA,
    TRACKER,
    fsync_write,
    iteration_dir,
    read_metadata,
    write_metadata,
)
from dense_model.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from dense_model.data.tokenizers import build_tokenizer
from dense_model.export.hf import DTYPES
from dense_model.export.mapping import Rule, from_hf, hf_shapes, weight_rules
from dense_model.export.olmoe import olmoe_import_notes, olmoe_model_section
from dense_model.fsreplace import ReplaceError, replacing


class HFImportError(RuntimeError):
    """HF_DIR cannot be imported as asked; the message names the file or field and the fix."""


# --------------------------------------------------------------------------------------------
# The table: Hugging Face architecture -> how its config becomes our model section.


def _refuse(where: str, value, why: str) -> HFImportError:
    return HFImportError(f"config.json: {where}={value!r}: {why}; dense_model cannot reproduce it exactly")


def _rope_theta(hf) -> int:
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":  # transformers 5 folds rope_scaling into rope_parameters
        raise _refuse("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"}, "RoPE scaling")
    theta = float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    if not theta.is_integer():
        raise _refuse("rope_theta", theta, "model.rotary_base is an integer")
    return int(theta)


def _llama_model(hf) -> dict:
    """LlamaConfig (and the variants reading the same fields) -> our model section."""
    if hf.hidden_act != "silu":
        raise _refuse("hidden_act", hf.hidden_act, "the Llama MLP here is SwiGLU (silu)")
    for name in ("attention_bias", "mlp_bias"):
        if getattr(hf, name, False):
            raise _refuse(name, True, "dense_model's linear layers have no bias")
    heads, hidden = hf.num_attention_heads, hf.hidden_size
    head_dim = getattr(hf, "head_dim", None)
    if hidden % heads or (head_dim is not None and head_dim != hidden // heads):
        raise _refuse("head_dim", head_dim, "dense_model's heads are hidden_size / num_attention_heads wide")
    groups = getattr(hf, "num_key_value_heads", None) or heads
    return dict(
        num_layers=hf.num_hidden_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=None if groups == heads else groups,
        activation="swiglu",
        ffn_hidden_size=hf.intermediate_size,
        vocab_size=hf.vocab_size,
        seq_length=hf.max_position_embeddings,
        rotary_base=_rope_theta(hf),
        norm_epsilon=float(hf.rms_norm_eps),
        init_method_std=float(hf.initializer_range),
        attention_dropout=float(getattr(hf, "attention_dropout", 0.0) or 0.0),
        untie_embeddings=not hf.tie_word_embeddings,
    )


def _mistral_model(hf) -> dict:
    """Mistral: Llama's tensors; a sliding window at least as long as the sequence is no window."""
    model = _llama_model(hf)
    window = getattr(hf, "sliding_window", None)
    if window is not None and window < model["seq_length"]:
        raise _refuse(
            "sliding_window",
            window,
            f"attention over the last {window} tokens only (max_position_embeddings="
            f"{model['seq_length']}); dense_model's attention is full causal",
        )
    return model


def _dense_model_model(hf) -> dict:
    """Our own export (``DenseModelForCausalLM``): Llama plus the activation and the MoE fields."""
    model = _llama_model(hf)  # the export writes hidden_act "silu"; the MLP reads ``activation``
    model.update(activation=hf.activation, activation_kwargs=dict(hf.activation_kwargs or {}))
    model["qk_norm"] = getattr(
        hf, "qk_norm", "none"
    )  # "full": OLMoE's q/k norm (exports before the field: none)
    if getattr(hf, "num_experts", None):
        model["moe"] = dict(
            num_experts=hf.num_experts,
            router_topk=hf.num_experts_per_tok,
            ffn_hidden_size=hf.moe_intermediate_size,
            shared_expert_ffn_hidden_size=hf.shared_expert_intermediate_size,
            router_score="topk_then_softmax" if getattr(hf, "norm_topk_prob", True) else "softmax_then_topk",
            activation_params=getattr(hf, "moe_activation_params", "per_expert"),  # exports before the field
        )
    return model


def _olmoe_model(hf) -> dict:
    """transformers' OlmoeForCausalLM: Llama's fields, the full-width q/k norm, SwiGLU experts in every
    layer (dense_model/export/olmoe.py)."""
    try:
        return olmoe_model_section(hf, _llama_model(hf))
    except ValueError as err:
        raise HFImportError(f"config.json: {err}; dense_model cannot reproduce it exactly") from None


def _qwen2_model(hf) -> dict:
    raise HFImportError(
        "config.json: architectures=['Qwen2ForCausalLM']: Qwen2 always has biases on q_proj/k_proj/"
        "v_proj; dense_model's attention has none, so it cannot reproduce it exactly"
    )


def _config_class(name: str):
    def load():
        import transformers

        return getattr(transformers, name)

    return load


def _dense_model_config_class():
    from dense_model.export.configuration_dense_model import DenseModelConfig

    return DenseModelConfig


@dataclass(frozen=True)
class Layout:
    """How one Hugging Face architecture maps onto our model. The tensors are named as Llama's
    (``mapping.weight_rules``); ``ignored``: tensors that carry nothing of the model (regexes)."""

    model_type: str  # config.json's model_type: the key when architectures names none of ours
    config_class: Callable[[], type]
    model: Callable[[object], dict]
    ignored: tuple[str, ...] = field(default=())


# Buffers some older Llama checkpoints saved: RoPE's frequencies, recomputed from rope_theta.
_ROTARY_BUFFERS = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
LAYOUTS: dict[str, Layout] = {
    "LlamaForCausalLM": Layout("llama", _config_class("LlamaConfig"), _llama_model, _ROTARY_BUFFERS),
    "MistralForCausalLM": Layout("mistral", _config_class("MistralConfig"), _mistral_model, _ROTARY_BUFFERS),
    "Qwen2ForCausalLM": Layout("qwen2", _config_class("Qwen2Config"), _qwen2_model),
    "DenseModelForCausalLM": Layout("dense_model", _dense_model_config_class, _dense_model_model),
    "OlmoeForCausalLM": Layout("olmoe", _config_class("OlmoeConfig"), _olmoe_model),
}


# --------------------------------------------------------------------------------------------
# Reading HF_DIR


def read_hf_config(hf_dir: Path):
    """(architecture, layout, transformers config object) of HF_DIR/config.json."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise HFImportError(f"{path} does not exist; HF_DIR must be a Hugging Face model folder")
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise HFImportError(f"{path} is not valid JSON: {err}") from None
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in LAYOUTS), None)
    if arch is None and not archs:  # no architectures (a bare config.save_pretrained): model_type
        arch = next((a for a, lay in LAYOUTS.items() if lay.model_type == raw.get("model_type")), None)
    if arch is None:
        raise HFImportError(
            f"{path}: architectures={archs!r} (model_type={raw.get('model_type')!r}) is none of "
            f"{', '.join(LAYOUTS)}; a new layout is one entry of LAYOUTS in dense_model/export/hf_import.py"
        )
    layout = LAYOUTS[arch]
    cls = layout.config_class()
    try:
        hf = cls.from_dict({k: v for k, v in raw.items() if k not in ("auto_map",)})
    except Exception as err:  # noqa: BLE001 - transformers' own validation of the fields
        raise HFImportError(f"{path}: transformers' {cls.__name__} rejects it: {err}") from None
    return arch, layout, hf, raw


WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


class TensorSource:
    """The tensors of HF_DIR, read one at a time.

    safetensors: each ``get`` opens the file and reads that one tensor with pread(2) (nothing is
    memory-mapped). pytorch_model.bin: each file is memory-mapped (``torch.load(mmap=True)``)
    when first needed and dropped once its last tensor has been read."""

    def __init__(self, hf_dir: Path):
        self.dir = hf_dir
        self._open_bin: dict[Path, dict] = {}  # before _names_in: a single .bin is opened to list its names
        found = next((name for name in WEIGHT_FILES if (hf_dir / name).is_file()), None)
        if found is None:
            raise HFImportError(f"{hf_dir} holds no weights: expected one of {', '.join(WEIGHT_FILES)}")
        self.safetensors = found.startswith("model.safetensors")
        if found.endswith(".index.json"):
            try:
                weight_map = json.loads((hf_dir / found).read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise HFImportError(f"{hf_dir / found}: no valid weight_map ({err})") from None
            self.file_of = {name: hf_dir / f for name, f in weight_map.items()}
        else:
            self.file_of = None  # one file: its names are read below
            single = hf_dir / found
        missing = sorted({str(p) for p in (self.file_of or {}).values() if not p.is_file()})
        if missing:
            raise HFImportError(f"{hf_dir / found} names {missing[0]}, which does not exist")
        if self.file_of is None:
            self.file_of = dict.fromkeys(self._names_in(single), single)
        self.remaining: dict[Path, int] = {}
        for path in self.file_of.values():
            self.remaining[path] = self.remaining.get(path, 0) + 1

    def _names_in(self, path: Path) -> list[str]:
        if self.safetensors:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        return list(self._bin(path))

    def _bin(self, path: Path) -> dict:
        if path not in self._open_bin:
            try:
                self._open_bin[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as err:  # noqa: BLE001 - torch's reasons vary
                raise HFImportError(f"{path}: cannot read it with torch.load ({err})") from None
        return self._open_bin[path]

    def names(self) -> list[str]:
        return list(self.file_of)

    def file_order(self, names) -> int:
        """Index (in file-name order) of the first file holding one of ``names``: filling the
        parameters file by file releases each .bin file's mapping as early as possible."""
        files = sorted(set(self.file_of.values()))
        return min(files.index(self.file_of[n]) for n in names)

    def shape(self, name: str) -> tuple[int, ...]:
        path = self.file_of[name]
        if self.safetensors:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return tuple(f.get_slice(name).get_shape())
        return tuple(self._bin(path)[name].shape)

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``; the caller copies it where it belongs (each name is read once)."""
        path = self.file_of[name]
        if self.safetensors:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", backend="pread") as f:  # read, not mapped
                tensor = f.get_tensor(name)
        else:
            tensor = self._bin(path)[name]
        self.remaining[path] -= 1
        if self.remaining[path] == 0:
            self._open_bin.pop(path, None)  # the last reference to that file's mapping
        return tensor


def choose_tokenizer(hf_dir: Path) -> tuple[str, list[Path]]:
    """(tokenizer_type, files to copy) for HF_DIR's tokenizer.

    huggingface with its tokenizer files when there is a tokenizer.json; sentencepiece with
    tokenizer.model when there is no tokenizer.json, or when our export wrote the SentencePiece
    model itself (dense_model.json: tokenizer.exported_as = sentencepiece)."""
    exported_as = None
    if (hf_dir / METADATA).is_file():
        try:
            exported_as = (read_metadata(hf_dir).get("tokenizer") or {}).get("exported_as")
        except ValueError:
            exported_as = None
    sp_model = hf_dir / "tokenizer.model"
    if (hf_dir / "tokenizer.json").is_file() and exported_as != "sentencepiece":
        names = (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "added_tokens.json",
            "tokenizer.model",
            "chat_template.jinja",
        )
        return "huggingface", [hf_dir / n for n in names if (hf_dir / n).is_file()]
    if sp_model.is_file():
        return "sentencepiece", [sp_model]
    raise HFImportError(
        f"{hf_dir} has no tokenizer: expected tokenizer.json (Hugging Face) or tokenizer.model (SentencePiece)"
    )


# --------------------------------------------------------------------------------------------
# The import


@dataclass
class ImportPlan:
    """What an import will do: the run config, the tensors per parameter, what is left over."""

    arch: str
    cfg: Config
    dtype: torch.dtype
    tokenizer_type: str
    tokenizer_files: list[Path]
    rules: list[Rule]
    source: TensorSource
    unmatched: list[str]  # HF tensors no rule reads
    missing: list[str]  # HF tensors a rule needs that HF_DIR lacks
    ignored: list[str]  # HF tensors that carry nothing (derived buffers, a tied lm_head)

    def describe(self) -> str:
        lines = [f"architecture {self.arch}; weights in {self.dtype}; tokenizer: {self.tokenizer_type}"]
        lines.append("mapping (ours <- Hugging Face):")
        for rule in self.rules:
            join = "" if rule.kind == "copy" else f"  [{rule.kind}]"
            lines.append(f"  {rule.name} <- {', '.join(rule.hf)}{join}")
        for name in self.ignored:
            lines.append(f"  (ignored) {name}")
        for name in self.missing:
            lines.append(f"  MISSING in HF_DIR: {name}")
        for name in self.unmatched:
            lines.append(f"  UNMATCHED (no parameter of ours): {name}")
        import yaml

        lines.append("config.yaml:")
        lines.append(yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False).rstrip())
        return "\n".join(lines)


def _model_section(hf_dir: Path, hf, layout: Layout) -> dict:
    """Our model section from the HF config. For our own export, the model section of its
    dense_model.json (which also holds what config.json does not: make_vocab_size_divisible_by,
    activation_modules, the MoE training settings, ...), once it agrees with config.json on every
    field config.json gives."""
    from dense_model.config import expert_ffn_hidden_size, ffn_hidden_size

    model = layout.model(hf)
    meta = hf_dir / METADATA
    if not meta.is_file():
        return model
    try:
        saved = (read_metadata(hf_dir).get("config") or {}).get("model")
        theirs = config_from_dict({"model": saved or {}}).model
    except (ValueError, ConfigError) as err:
        raise HFImportError(f"{meta}: cannot read its config ({err})") from None
    if not saved:
        return model
    ours = config_from_dict({"model": model}).model
    derived = {
        "ffn_hidden_size": ffn_hidden_size,
        "moe": lambda m: (
            m.moe.num_experts
            and (
                m.moe.num_experts,
                m.moe.router_topk,
                expert_ffn_hidden_size(m),
                m.moe.shared_expert_ffn_hidden_size,
                m.moe.router_score,
            )
        ),
    }
    for key in model:
        get = derived.get(key, lambda m, key=key: getattr(m, key))
        if get(theirs) != get(ours):
            raise HFImportError(f"{meta}: model.{key} is {get(theirs)!r} but config.json says {get(ours)!r}")
    return saved


def plan_import(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "auto") -> ImportPlan:
    """Read HF_DIR's config, tokenizer and tensor names (no tensor data) and check they map."""
    from dense_model.model import activation_entry

    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise HFImportError(f"HF_DIR {hf_dir} is not a folder")
    arch, layout, hf, raw = read_hf_config(hf_dir)
    if dtype == "auto":
        stored = getattr(hf, "dtype", None) or raw.get("torch_dtype")
        stored = str(stored).removeprefix("torch.") if stored is not None else "float32"
        target = DTYPES.get(stored, torch.float32)
    elif dtype in DTYPES:
        target = DTYPES[dtype]
    else:
        raise HFImportError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    tokenizer_type, tokenizer_files = choose_tokenizer(hf_dir)
    out = Path(out_dir).resolve()
    tokenizer_path = out / ("tokenizer" if tokenizer_type == "huggingface" else "tokenizer.model")
    try:
        cfg = config_from_dict(
            {
                "run_dir": str(out),
                "model": _model_section(hf_dir, hf, layout),
                "data": {"tokenizer_type": tokenizer_type, "tokenizer_model": str(tokenizer_path)},
                "checkpoint": {"load": str(out)},
            }
        )
        cfg.model.validate()
    except ConfigError as err:
        raise HFImportError(f"{hf_dir / 'config.json'}: {err}") from None
    tok_source = tokenizer_files[0] if tokenizer_type == "sentencepiece" else hf_dir
    try:
        tokenizer = build_tokenizer(tokenizer_type, str(tok_source))
    except Exception as err:  # noqa: BLE001 - the tokenizer libraries' reasons vary
        raise HFImportError(f"{tok_source}: cannot load the {tokenizer_type} tokenizer ({err})") from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise HFImportError(
            f"{tok_source}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
            f"{cfg.model.vocab_size}; the embedding has no row for the ids above it"
        )
    activation_entry(cfg.model)  # imports model.activation_modules (our export's own activations)
    source = TensorSource(hf_dir)
    rules = weight_rules(cfg.model)
    wanted = {name for rule in rules for name in rule.hf}
    present = set(source.names())
    ignored = sorted(n for n in present - wanted if any(re.fullmatch(p, n) for p in layout.ignored))
    if not cfg.model.untie_embeddings and "lm_head.weight" in present:
        ignored.append("lm_head.weight")  # tied: transformers, too, uses embed_tokens
    missing = [n for rule in rules for n in rule.hf if n not in present]
    unmatched = sorted(present - wanted - set(ignored))
    return ImportPlan(
        arch, cfg, target, tokenizer_type, tokenizer_files, rules, source, unmatched, missing, ignored
    )


def build_empty_model(plan: ImportPlan):
    """(model, {state-dict name: parameter}): our model at TP=1, PP=1 in the plan's dtype, allocated
    on the CPU but not initialised (every parameter is then filled from HF_DIR)."""
    from megatron.core import parallel_state

    from dense_model.model import build_model
    from dense_model.parallel import initialize_parallel

    cfg = config_from_dict(config_to_dict(plan.cfg))
    cfg.training.recompute_granularity = "none"  # (no training here: megatron warns otherwise)
    initialize_parallel(1, 1, seed=cfg.training.seed)
    if parallel_state.get_tensor_model_parallel_world_size() != 1 or (
        parallel_state.get_pipeline_model_parallel_world_size() != 1
    ):
        raise HFImportError(
            "the import builds the model at TP=1, PP=1; run import_hf.py as a plain python process"
        )
    model = build_model(
        cfg, initialize=False, allocate_only=True, device=torch.device("cpu"), dtype=plan.dtype
    )
    params = {
        k: v
        for k, v in model.state_dict(keep_vars=True).items()
        if isinstance(v, torch.Tensor) and not k.endswith("._extra_state")
    }
    return model, params


def shape_mismatches(plan: ImportPlan, params: dict) -> list[str]:
    """HF_DIR's tensors whose shape is not the one our parameters (``params``, TP=1) need."""
    bad = []
    m = plan.cfg.model
    present = set(plan.source.names())
    for rule in plan.rules:
        name = next((n for n in rule.ours if n in params), None)
        if name is None:
            bad.append(f"our model has no parameter {rule.name}")
            continue
        ours = list(params[name].shape)
        if rule.kind == "vocab":
            ours[0] = m.vocab_size
        for hf_name, want in zip(rule.hf, hf_shapes(rule, tuple(ours), m), strict=True):
            got = plan.source.shape(hf_name) if hf_name in present else want
            if got != want:
                bad.append(f"{hf_name} is {list(got)}, expected {list(want)} from config.json")
    return bad


IMPORT_MARKER = "imported_from.json"  # OUT/imported_from.json: this run directory is an import


def _an_untrained_import(out: Path) -> bool:
    """Whether ``out`` is an earlier import nobody trained in: its marker, the tracker still at the
    import's iteration 0 with no other checkpoint, no metrics, no lock, no TensorBoard."""
    root = out / CHECKPOINTS
    try:
        marker = json.loads((out / IMPORT_MARKER).read_text())
        tracker = (root / TRACKER).read_text().strip()
        checkpoints = sorted(p.name for p in root.iterdir())
    except (OSError, ValueError):
        return False
    trained = [n for n in ("metrics.jsonl", "job.lock", "tensorboard") if os.path.lexists(out / n)]
    return (
        isinstance(marker, dict)
        and tracker == "0"
        and checkpoints == sorted([TRACKER, iteration_dir(root, 0).name])
        and not trained
        and not any(out.glob("metrics.attempt-*.jsonl"))
    )


def _output_rules(hf_dir: Path, overwrite: bool) -> dict:
    """How ``fsreplace.replacing`` treats OUT_RUN_DIR: never HF_DIR or a folder holding it, and
    over an existing run directory only an import nobody trained in."""
    return dict(
        what="import",
        overwrite=overwrite,
        label="OUT_RUN_DIR",
        kind="an earlier import nobody trained in",
        ours=_an_untrained_import,
        apart=[(hf_dir, "HF_DIR", ("is", "contains"))],
    )


def _check_output(hf_dir: Path, out: Path, overwrite: bool) -> None:
    """HFImportError now, before the model is read, for an OUT_RUN_DIR the import would refuse
    at the end (checked again, under the lock, before anything is replaced)."""
    try:
        with replacing(out, **_output_rules(hf_dir, overwrite)):
            raise _Checked
    except _Checked:
        pass
    except ReplaceError as err:
        raise HFImportError(str(err)) from None


class _Checked(Exception):
    """Leaves ``replacing`` once its checks passed, publishing nothing."""


@torch.no_grad()
def import_hf(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Import HF_DIR into the run directory ``out_dir`` (see the module docstring). Starts the
    process groups (world size 1) if needed; HFImportError before anything is written."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    _check_output(hf_dir, out, overwrite)
    plan = plan_import(hf_dir, out, dtype)
    if plan.missing or plan.unmatched:
        raise HFImportError(
            f"{hf_dir}: tensors do not match the {plan.arch} layout: "
            + (f"missing {plan.missing[:4]} " if plan.missing else "")
            + (f"unmatched {plan.unmatched[:4]} " if plan.unmatched else "")
            + "(--dry-run lists them all)"
        )
    cfg = plan.cfg
    model, params = build_empty_model(plan)
    bad = shape_mismatches(plan, params)
    if bad:
        raise HFImportError(f"{hf_dir}: {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    filled: set[str] = set()
    for rule in sorted(plan.rules, key=lambda r: plan.source.file_order(r.hf)):  # stable: table order
        name = next(n for n in rule.ours if n in params)
        target = params[name]
        tensors = [plan.source.get(n) for n in rule.hf]
        target.data.copy_(from_hf(rule, tensors, cfg.model, rows=target.shape[0]))
        del tensors
        filled.add(name)
    unfilled = sorted(set(params) - filled)
    if unfilled:
        raise HFImportError(f"our model has parameters no Hugging Face tensor fills: {unfilled[:5]}")

    try:
        with replacing(out, **_output_rules(hf_dir, overwrite)) as tmp:
            _write_run(tmp, hf_dir, plan, model)
            del model, params
    except ReplaceError as err:
        raise HFImportError(str(err)) from None
    return out


def _write_run(tmp: Path, hf_dir: Path, plan: ImportPlan, model) -> None:
    """The run directory (see the module docstring) in ``tmp``, to be renamed to the final name."""
    from megatron.core import dist_checkpointing

    cfg = plan.cfg
    root = tmp / CHECKPOINTS
    folder = iteration_dir(root, 0)
    folder.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(folder))
    tok_dir = tmp / Path(cfg.data.tokenizer_model).name
    if plan.tokenizer_type == "huggingface":
        tok_dir.mkdir()
        for path in plan.tokenizer_files:
            shutil.copy2(path, tok_dir / path.name)
    else:
        shutil.copy2(plan.tokenizer_files[0], tok_dir)
    staged = config_from_dict(config_to_dict(cfg))
    staged.data.tokenizer_model = str(tok_dir)
    write_metadata(folder, 0, staged, weights_only=True)
    # the metadata names the final paths (the tokenizer copy above was made from the staging one)
    meta = read_metadata(folder)
    meta["config"] = config_to_dict(cfg)
    fsync_write(folder / METADATA, json.dumps(meta, indent=2))
    save_config(cfg, folder / "config.yaml")
    fsync_write(root / TRACKER, "0")
    save_config(cfg, tmp / "config.yaml")
    fsync_write(tmp / IMPORT_MARKER, json.dumps({"hf_dir": str(hf_dir.resolve()), "iteration": 0}))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="import_hf.py",
        description="Import a Hugging Face model folder into a dense_model run directory (weights-only checkpoint).",
    )
    parser.add_argument(
        "hf_dir",
        help="Hugging Face model folder (config.json, *.safetensors or pytorch_model.bin, tokenizer)",
    )
    parser.add_argument(
        "out_run_dir", help="run directory to write (must be empty or absent unless --overwrite)"
    )
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPES], help="weights dtype; auto = config.json's dtype"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the mapping and the config; write nothing"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_RUN_DIR")
    args = parser.parse_args(argv)
    from dense_model.compat.quiet import filter_known_warnings

    filter_known_warnings()
    try:
        if args.dry_run:
            plan = plan_import(args.hf_dir, args.out_run_dir, args.dtype)
            print(plan.describe())
            bad = shape_mismatches(plan, build_empty_model(plan)[1])
            for line in bad:
                print(f"  SHAPE: {line}")
            if plan.missing or plan.unmatched or bad:
                print(
                    f"import_hf: error: {len(plan.missing)} missing, {len(plan.unmatched)} unmatched and "
                    f"{len(bad)} misshapen tensors (listed above)",
                    file=sys.stderr,
                )
                return 2
            return 0
        out = import_hf(args.hf_dir, args.out_run_dir, args.dtype, args.overwrite)
    except HFImportError as err:
        print(f"import_hf: error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        if "megatron.core.parallel_state" in sys.modules:
            from dense_model.parallel import destroy_parallel

            destroy_parallel()
    print(
        f"imported {args.hf_dir} -> {out} (train: run_pretrain.sh {out}/config.yaml run_dir=NEW data.blend=...)"
    )
    for note in olmoe_import_notes(load_config(str(out / "config.yaml")).model):
        print(note)
    return 0
