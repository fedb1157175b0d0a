"""The lm-eval model ``dense_model``: our checkpoints scored natively on megatron-core, no conversion.

    import dense_model.evaluation                      # registers "dense_model" with lm-eval
    lm_eval.simple_evaluate(model="dense_model", model_args={"pretrained": RUN_DIR}, tasks=[...])

or ``toolkits/evaluation/run_lm_eval.sh CHECKPOINT TASKS`` (dense_model/evaluation/run.py).

``pretrained`` is a run directory, its checkpoints/ folder or one iter_NNNNNNN folder; the model is
built from the checkpoint's saved config and scored with the saved tokenizer copy. The model runs
in bf16 on a GPU and fp32 on the CPU (``dtype`` overrides), at TP = the launcher's world size
(``torchrun --nproc-per-node 2 ...`` for TP=2, PP=1, whatever layout trained it). Under TP every
rank handles every request (lm-eval sees rank 0 of 1 on each, and lm-eval lets only LOCAL_RANK 0
write results); the vocab-parallel logits are all-gathered, so all ranks take identical decisions.

The scoring itself (encoding, batching, log-likelihoods, rolling windows, greedy generation and
their conventions) is ``dense_model.training.lm_scoring.MegatronLM``, which the trainer's in-loop
evaluation uses on the live model too: a checkpoint scores the same either way.
"""

from __future__ import annotations

import logging

import torch
from lm_eval.api.registry import register_model

from dense_model.checkpoint.inference import load_model_for_inference
from dense_model.training.lm_scoring import DEFAULT_BATCH_SIZE, MegatronLM

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("dense_model")
class DenseModelLM(MegatronLM):
    """lm-eval ``TemplateLM`` over a dense_model checkpoint (megatron-core GPTModel)."""

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        dtype: str = "auto",
        prefix_token_id: int | None = None,
        tensor_model_parallel_size: int | None = None,
        device: str | None = None,
        **unused,
    ) -> None:
        if unused:
            logger.warning("dense_model ignores model arguments %s", sorted(unused))
        # ``device``: lm-eval always passes one (default "cuda:0"); the model runs on the GPU when there
        # is one and on the CPU otherwise, one GPU per rank (LOCAL_RANK), so it is not used.
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of auto, {', '.join(DTYPES)}")
        on_gpu = torch.cuda.is_available()
        want = (torch.bfloat16 if on_gpu else torch.float32) if dtype == "auto" else DTYPES[dtype]
        # Built in the dtype asked for, so megatron-core's config (softmax output dtype, ...) agrees.
        loaded = load_model_for_inference(pretrained, tensor_model_parallel_size, dtype=want)
        if loaded.tokenizer is None:
            raise ValueError(
                f"checkpoint {loaded.folder} carries no tokenizer copy (data.tokenizer_model was unset when "
                "it was saved), so text cannot be encoded"
            )
        super().__init__(
            loaded.model,
            loaded.config,
            loaded.tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            max_gen_toks=max_gen_toks,
            prefix_token_id=prefix_token_id,
        )
        self.checkpoint, self.iteration = loaded.folder, loaded.iteration

    def get_model_info(self) -> dict:
        """Goes into the results JSON's ``config`` (scripts/compare_evals.py reads it)."""
        from megatron.core import parallel_state

        # tokens trained, for plots over tokens (a batch-size ramp-up is not counted)
        tokens = self.iteration * self.config.training.global_batch_size * self.config.model.seq_length
        return {
            "dense_model_checkpoint": str(self.checkpoint),
            "dense_model_iteration": self.iteration,
            "dense_model_tokens": tokens,
            "dense_model_activation": self.config.model.activation,
            "dense_model_tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
            "dense_model_dtype": str(self.dtype).removeprefix("torch."),
        }
