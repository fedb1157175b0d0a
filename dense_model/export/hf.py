"""Export a dense_model checkpoint to a Hugging Face folder that ``AutoModelForCausalLM`` loads.

    python toolkits/checkpoint_conversion/export_hf.py RUN_DIR_OR_ITER_DIR OUTPUT_DIR [--dtype bfloat16]

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(OUTPUT_DIR)                          # SwiGLU: plain Llama
    model = AutoModelForCausalLM.from_pretrained(OUTPUT_DIR, trust_remote_code=True)  # other activations, MoE
    model = AutoModelForCausalLM.from_pretrained(OUTPUT_DIR)  # SwiGLU experts, model.qk_norm full: OLMoE
    tokenizer = AutoTokenizer.from_pretrained(OUTPUT_DIR)

The checkpoint is loaded at TP=1, PP=1 whatever layout saved it (dist_checkpointing reshards), so
every layout exports the same bytes. The folder holds config.json, model*.safetensors (sharded
with an index above ``max_shard_size``), generation_config.json, the tokenizer (see tokenizer.py;
checked against the training tokenizer before the folder gets its final name), dense_model.json
(the checkpoint's metadata, and the tokenizer file the export was made from with its sha256) and,
for activations other than SwiGLU and for every MoE, the ``trust_remote_code`` files (``auto_map``; Llama with the MLP
swapped, see modeling_dense_model.py): configuration_dense_model.py, modeling_dense_model.py and the
activation's own source from the registry (``remote_code_files``), so the exported model runs the
same math.

The weight mapping (our names -> Llama's, MoE included) is the table in mapping.py, which the
import (hf_import.py) reads in the other direction. SwiGLU experts with ``model.qk_norm: full``
export as transformers' own ``OlmoeForCausalLM`` instead (``--format auto``/``olmoe``, olmoe.py);
any other model with it as the remote code with OLMoE's ``self_attn.q_norm`` / ``k_norm``.

The router settings the HF block implements are checked on the loaded model's TransformerConfig
(``MOE_ROUTER_AS_EXPORTED``); a checkpoint with any other (token dropping by capacity, ...) is refused.

The vocabulary padding (``padded_vocab_size``) is cut back to ``model.vocab_size``. Every parameter of the checkpoint must be
placed (an unknown one is an error), and the result is checked name by name and shape by shape
against the transformers model built on the meta device before anything is written.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from dense_model import collectives
from dense_model.activations import get_activation_entry
from dense_model.checkpoint import CheckpointError, read_metadata, resolve_checkpoint
from dense_model.checkpoint.inference import load_model_for_inference
from dense_model.config import Config, config_from_dict, expert_ffn_hidden_size, ffn_hidden_size, moe_enabled
from dense_model.data.tokenizers import build_tokenizer
from dense_model.export.configuration_dense_model import DenseModelConfig
from dense_model.export.mapping import to_hf, weight_rules
from dense_model.export.olmoe import FORMATS, olmoe_config, olmoe_refusal, olmoe_tensor_shapes, wants_olmoe
from dense_model.export.output import OutputError, check_outside_run, staged_output
from dense_model.export.tokenizer import export_tokenizer, tokenizer_mismatch
from dense_model.parallel import destroy_parallel

REMOTE_CODE_FILES = ("configuration_dense_model.py", "modeling_dense_model.py")
ACTIVATIONS_PACKAGE = "dense_model.activations"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# megatron-core TransformerConfig field -> the value DenseModelSparseMoeBlock reproduces (dropless
# top-k routing, softmax over the top-k logits or, moe_router_pre_softmax, over all experts
# (config.json's norm_topk_prob), probabilities applied to the expert outputs).
MOE_ROUTER_AS_EXPORTED = {
    "moe_expert_capacity_factor": None,
    "moe_router_score_function": "softmax",
    "moe_router_topk_scaling_factor": None,
    "moe_router_enable_expert_bias": False,
    "moe_router_num_groups": None,
    "moe_router_group_topk": None,
    "moe_router_dtype": None,
    "moe_input_jitter_eps": None,
    "moe_router_force_load_balancing": False,
    "moe_shared_expert_gate": False,
    "moe_apply_probs_on_input": False,
    "moe_latent_size": None,
    "add_bias_linear": False,
}


class ExportError(RuntimeError):
    """The checkpoint cannot be exported as asked; the message says why."""


def hf_config(cfg: Config, special_ids: dict, dtype: torch.dtype):
    """``LlamaConfig`` (SwiGLU) or ``DenseModelConfig`` (any other activation) for ``cfg``."""
    m = cfg.model
    kwargs = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=ffn_hidden_size(m),
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        head_dim=m.hidden_size // m.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=m.seq_length,
        rms_norm_eps=m.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=not m.untie_embeddings,
        initializer_range=m.init_method_std,
        bos_token_id=special_ids.get("bos_token_id"),
        eos_token_id=special_ids.get("eos_token_id"),
        pad_token_id=None,
        dtype=str(dtype).removeprefix("torch."),
    )
    if m.activation == "swiglu" and not moe_enabled(m) and m.qk_norm == "none":
        from transformers import LlamaConfig

        config = LlamaConfig(**kwargs)
        config.architectures = ["LlamaForCausalLM"]
        return config

    if moe_enabled(m):
        kwargs.update(
            num_experts=m.moe.num_experts,
            num_experts_per_tok=m.moe.router_topk,
            moe_intermediate_size=expert_ffn_hidden_size(m),
            shared_expert_intermediate_size=m.moe.shared_expert_ffn_hidden_size,
            norm_topk_prob=m.moe.router_score == "topk_then_softmax",  # else OLMoE's softmax, top-k
            moe_activation_params=m.moe.activation_params,  # shared: one mlp.act_fn per layer
        )
    if m.qk_norm == "full":  # OLMoE's q/k norm (export_as_olmoe refuses per_head)
        kwargs.update(qk_norm="full")
    config = DenseModelConfig(activation=m.activation, activation_kwargs=dict(m.activation_kwargs), **kwargs)
    config.architectures = ["DenseModelForCausalLM"]
    config.auto_map = {
        "AutoConfig": "configuration_dense_model.DenseModelConfig",
        "AutoModelForCausalLM": "modeling_dense_model.DenseModelForCausalLM",
    }
    return config


def convert_state_dict(state: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """Megatron GPTModel state (TP=1, PP=1) -> transformers Llama names (``mapping.weight_rules``,
    the table the import reads backwards). Raises on leftovers."""
    m = cfg.model
    state = {k: v for k, v in state.items() if not k.endswith("._extra_state")}
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for rule in weight_rules(m):
        name = next((n for n in rule.ours if n in state), None)
        if name is None:
            raise ExportError(f"the checkpoint has no parameter {' or '.join(rule.ours)}")
        used.add(name)
        out.update(zip(rule.hf, to_hf(rule, state[name], m), strict=True))
    leftover = sorted(set(state) - used)
    if leftover:
        raise ExportError(
            f"the checkpoint has parameters the export does not know where to put: {', '.join(leftover[:8])}"
            + (" ..." if len(leftover) > 8 else "")
        )
    return out


def check_moe_router(transformer_config, folder: Path) -> None:
    """ExportError unless megatron-core's router and MoE settings are those the HF block reproduces."""
    for field, exported in MOE_ROUTER_AS_EXPORTED.items():
        value = getattr(transformer_config, field, exported)
        if value != exported:
            why = (
                " (model.moe.capacity_factor: tokens over an expert's capacity are dropped, depending on the batch)"
                if field == "moe_expert_capacity_factor"
                else ""
            )
            raise ExportError(
                f"{folder}: the MoE layers run megatron-core's {field}={value!r}{why}; the Hugging Face "
                f"export's MoE block reproduces {field}={exported!r} only (evaluate this checkpoint "
                "with the lm-eval model dense_model instead)"
            )
    if transformer_config.moe_router_load_balancing_type == "sinkhorn":
        raise ExportError(f"{folder}: sinkhorn routing is not reproduced by the Hugging Face export")


def remote_code_files(activation: str) -> dict[str, str]:
    """File name -> source of the ``trust_remote_code`` files of a model whose MLP runs ``activation``.

    The modeling and configuration files of this folder; the module that registers the activation
    (in dense_model or named in ``model.activation_modules``) and, transitively, the
    dense_model.activations modules it imports at module level (the registry, _polycom.py), each
    copied with those imports made relative so that transformers copies and loads them together;
    and activation_dense_model.py, which imports the activation's module (registering it) and the
    registry functions modeling_dense_model.py uses. Imports inside functions are left as they are
    (``load_fused_kernel``'s Triton import: training only).
    """
    here = Path(__file__).parent
    files = {name: (here / name).read_text() for name in REMOTE_CODE_FILES}
    cls = get_activation_entry(activation).cls
    todo, shipped = [cls.__module__], {}
    while todo:
        module_name = todo.pop()
        if module_name in shipped:
            continue
        shipped[module_name] = module_name.rpartition(".")[2]
        source = Path(importlib.import_module(module_name).__file__).read_text()
        lines = source.splitlines(keepends=True)
        for node in ast.parse(source).body:
            if not (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and node.module.split(".")[0] == "dense_model"
            ):
                continue
            dep = node.module
            if dep == ACTIVATIONS_PACKAGE:  # the package re-exports the registry's functions
                dep = f"{ACTIVATIONS_PACKAGE}.registry"
                missing = [a.name for a in node.names if not hasattr(importlib.import_module(dep), a.name)]
                if missing:
                    raise ExportError(
                        f"{module_name}: the export ships only the registry of {ACTIVATIONS_PACKAGE}, not {missing}"
                    )
            if not dep.startswith(ACTIVATIONS_PACKAGE + ".") or dep.count(".") != 2:
                raise ExportError(
                    f"{module_name} line {node.lineno}: the export copies only modules of {ACTIVATIONS_PACKAGE} "
                    f"next to the model, not {dep}; import it inside the function that needs it"
                )
            line = lines[node.lineno - 1]
            lines[node.lineno - 1] = line.replace(
                f"from {node.module} import", f"from .{dep.rpartition('.')[2]} import", 1
            )
            todo.append(dep)
        name = shipped[module_name] + ".py"
        if name in files:
            raise ExportError(
                f"{module_name} would overwrite {name} in the exported folder; rename the module"
            )
        files[name] = "".join(lines)
    files["activation_dense_model.py"] = (
        f'"""The MLP activation {activation!r}: dense_model\'s registry and the module that registers it,\n'
        'copied next to this file by the export."""\n\n'
        f"from .{shipped[cls.__module__]} import {cls.__name__}  # noqa: F401  (registers {activation!r})\n"
        "from .registry import build_activation, is_gated  # noqa: F401\n"
    )
    return files


def check_against_hf_model(weights: dict[str, torch.Tensor], config, folder: Path) -> None:
    """Build the transformers model on the meta device; names and shapes must match ``weights``.

    A non-Llama model is built from the remote code already written to ``folder``, as a user loads it;
    OLMoE's expected tensors are its hub layout (``olmoe.olmoe_tensor_shapes``)."""
    if config.model_type == "olmoe":
        _check_names_and_shapes(weights, olmoe_tensor_shapes(config), "OlmoeForCausalLM")
        return
    if config.model_type == "llama":
        from transformers import LlamaForCausalLM as cls
    else:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        cls = get_class_from_dynamic_module("modeling_dense_model.DenseModelForCausalLM", str(folder))

    with torch.device("meta"):
        model = cls(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    _check_names_and_shapes(weights, expected, cls.__name__)


def _check_names_and_shapes(weights: dict[str, torch.Tensor], expected: dict, model_name: str) -> None:
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        shapes = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise ExportError(
            f"converted weights do not fit {model_name}: missing {missing[:5]}, unexpected {extra[:5]}, "
            f"shape mismatch {[(k, got[k], expected[k]) for k in shapes[:5]]}"
        )


def stored_dtype(folder: Path) -> torch.dtype:
    """The dtype the checkpoint stores its weights in (bf16 for GPU runs), from its metadata."""
    from megatron.core import dist_checkpointing

    try:
        meta = dist_checkpointing.load_tensors_metadata(str(folder))
    except Exception:  # an unreadable metadata file: the load below reports it properly
        return torch.float32
    for key, value in meta.items():
        if key.endswith("word_embeddings.weight") and getattr(value, "dtype", None) is not None:
            return value.dtype
    return torch.float32


def save_safetensors(weights: dict[str, torch.Tensor], out_dir: Path, max_shard_size: str | int) -> None:
    """model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(weights, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file(
            {n: weights[n].contiguous() for n in names}, str(out_dir / filename), metadata={"format": "pt"}
        )
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def export_hf(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    fmt: str = "auto",
) -> Path:
    """Export ``checkpoint`` (run directory, checkpoints/ folder or iter_NNNNNNN) to ``output_dir``.

    ``dtype``: "auto" (the dtype the checkpoint stores: bf16 for GPU runs, fp32 for CPU runs),
    "float32", "bfloat16" or "float16". ``fmt``: "auto" (Llama, our remote code, or, for
    ``model.qk_norm: full``, transformers' OlmoeForCausalLM) or "olmoe" (OlmoeForCausalLM or an
    ExportError saying why not). Starts the process groups (world size 1) if needed.
    """
    folder = resolve_checkpoint(checkpoint)  # CheckpointError for a missing or foreign path
    output_dir = Path(output_dir)
    check_outside_run(
        Path(checkpoint), folder, output_dir
    )  # OutputError: the export could delete its own source
    if dtype != "auto" and dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    # rank 0 writes: one export per output (a lock), published by renames (see export/output.py)
    with staged_output(output_dir, overwrite) if collectives.rank() == 0 else contextlib.nullcontext() as tmp:
        _export(folder, tmp, dtype, max_shard_size, fmt)
    collectives.barrier()  # NCCL's barrier needs the device named (collectives.barrier)
    return output_dir


def export_as_olmoe(m, fmt: str, folder: Path) -> bool:
    """Whether the model ``m`` exports as transformers' OlmoeForCausalLM (``fmt``: --format): asked
    for (an ExportError when OLMoE cannot run it exactly), or ``auto`` with the full q/k norm and a
    model OLMoE expresses (otherwise our remote code, which has the full q/k norm too); an
    ExportError for megatron-core's per-head q/k norm, which no exported layout has."""
    if m.qk_norm == "per_head":  # no transformers layout has it
        raise ExportError(
            f"{folder}: model.qk_norm='per_head': no Hugging Face layout here has megatron-core's "
            "per-head q/k norm (evaluate this checkpoint with the lm-eval model dense_model instead)"
        )
    refusal = olmoe_refusal(m) if wants_olmoe(m, fmt) else None
    if refusal and fmt == "olmoe":
        fix = (
            "export without --format olmoe (Llama or our trust_remote_code model)"
            if m.qk_norm == "none"
            else "export without --format olmoe (our trust_remote_code model has the full q/k norm)"
        )
        raise ExportError(f"{folder}: --format olmoe, but OlmoeForCausalLM {refusal}; {fix}")
    return wants_olmoe(m, fmt) and refusal is None


def _export(folder: Path, tmp: Path | None, dtype: str, max_shard_size: str | int, fmt: str = "auto") -> None:
    """Load ``folder`` and, on rank 0 (``tmp`` not None), write the HF files into ``tmp``."""
    from megatron.core import parallel_state

    target = stored_dtype(folder) if dtype == "auto" else DTYPES[dtype]

    # what config.json can say is decided from the checkpoint's config, before the (long) load
    as_olmoe = export_as_olmoe(config_from_dict(read_metadata(folder)["config"]).model, fmt, folder)
    loaded = load_model_for_inference(folder, tensor_model_parallel_size=1)
    if parallel_state.get_tensor_model_parallel_world_size() != 1 or (
        parallel_state.get_pipeline_model_parallel_world_size() != 1
    ):
        raise ExportError(
            "export loads the model at TP=1, PP=1 but this process already runs another layout; "
            "run export_hf.py as a plain python process"
        )
    cfg = loaded.config
    if moe_enabled(cfg.model):
        check_moe_router(loaded.model.config, folder)
    state = {
        k: v.detach().to("cpu") for k, v in loaded.model.state_dict().items() if isinstance(v, torch.Tensor)
    }
    weights = {k: v.to(target) for k, v in convert_state_dict(state, cfg).items()}

    if tmp is not None:
        special, tokenizer_provenance = {"bos_token_id": None, "eos_token_id": None}, None
        if cfg.data.tokenizer_model:
            tokenizer_provenance, special = _export_checked_tokenizer(cfg, tmp)
        config = olmoe_config(cfg, special, target) if as_olmoe else hf_config(cfg, special, target)
        if config.model_type not in ("llama", "olmoe"):  # transformers' own classes need no code
            for name, source in remote_code_files(cfg.model.activation).items():
                (tmp / name).write_text(source)
        check_against_hf_model(weights, config, tmp)
        config.save_pretrained(str(tmp))
        _generation_config(config).save_pretrained(str(tmp))
        save_safetensors(weights, tmp, max_shard_size)
        provenance = {"source": str(folder), **read_metadata(folder)}
        if tokenizer_provenance is not None:
            provenance["tokenizer"] = tokenizer_provenance
        (tmp / "dense_model.json").write_text(json.dumps(provenance, indent=2))


def _export_checked_tokenizer(cfg: Config, folder: Path) -> tuple[dict, dict]:
    """Export the training tokenizer into ``folder`` and check it there, loaded through AutoTokenizer,
    against the tokenizer training used (the single source of truth) on the built-in probe texts.
    Returns (provenance for dense_model.json, special ids for config.json); ExportError on a mismatch,
    before anything is moved to the final name."""
    data = cfg.data
    exported = export_tokenizer(
        data.tokenizer_type, data.tokenizer_model, folder, model_max_length=cfg.model.seq_length
    )
    mismatch = tokenizer_mismatch(build_tokenizer(data.tokenizer_type, data.tokenizer_model), folder)
    if mismatch:
        shutil.rmtree(folder, ignore_errors=True)
        raise ExportError(
            f"the exported tokenizer does not reproduce {data.tokenizer_model} (data.tokenizer_model): "
            f"{mismatch}; the export was abandoned, nothing was written to the output folder"
        )
    return exported.provenance, exported.special_ids


def _generation_config(config):
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="export_hf.py",
        description="Export a dense_model checkpoint to a Hugging Face folder (AutoModelForCausalLM).",
    )
    parser.add_argument(
        "checkpoint", help="run directory, its checkpoints/ folder, or one iter_NNNNNNN folder"
    )
    parser.add_argument("output_dir", help="folder to write (must be empty or absent unless --overwrite)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="weights dtype; auto = as stored in the checkpoint (bf16 for GPU runs)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument(
        "--format",
        default="auto",
        choices=FORMATS,
        help="olmoe: transformers' OlmoeForCausalLM (SwiGLU experts, model.qk_norm full) or an error; "
        "auto: that for model.qk_norm full, else Llama or the trust_remote_code model",
    )
    args = parser.parse_args(argv)
    try:
        out = export_hf(
            args.checkpoint, args.output_dir, args.dtype, args.max_shard_size, args.overwrite, args.format
        )
    except (CheckpointError, ExportError, OutputError) as err:
        print(f"export_hf: error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        if "megatron.core.parallel_state" in sys.modules:  # only if the load got that far
            destroy_parallel()
    print(f"exported {args.checkpoint} -> {out}")
    return 0
