"""lm-eval's ``TemplateLM`` over a megatron-core GPTModel that is already built: the scoring core
of our lm-eval model, shared by the trainer's in-loop evaluation (the live model, ``downstream.py``)
and the ``dense_model`` model of ``dense_model/evaluation/adapter.py`` (a checkpoint loaded for
evaluation). It sits on the training floor so the trainer can use it without importing the apps.

Under TP every rank handles every request (lm-eval sees rank 0 of 1 on each); the vocab-parallel
logits are all-gathered, so all ranks take identical decisions. ``checkpoint.inference`` builds the
model as one stage (PP = 1, no sequence parallelism); the trainer's live model may be laid out
otherwise, and every forward follows the layout it was built with:
  * sequence parallelism: each forward's sequence is right-padded to a multiple of TP (its tokens
    are split over the TP ranks); the causal mask keeps the padding out of every real position.
  * PP > 1: every stage of a pipeline takes the same requests and computes each forward's shape
    itself; the first stage embeds, each stage sends its output to the next (torch.distributed
    send/recv over the pipeline group), and only the last stage has logits: the scores on the other
    stages are placeholders (0.0, False), which the caller replaces with the last stage's
    (``downstream.DataParallelLM``). Generation broadcasts each step's tokens from the last stage.
  * Under either, generation runs without a KV cache (a forward over the tokens so far per step):
    the one-token decode step can be neither split over TP ranks nor fed to a middle stage.

Conventions:
  * Nothing is added to encoded text (our pretraining has no BOS). An empty context and each
    rolling window are conditioned on ``prefix_token_id``, by default EOD, the token every
    training document follows. The Hugging Face export names EOD as its BOS, so lm-eval's ``hf``
    model on an exported folder conditions the same way.
  * Logits beyond ``model.vocab_size`` (the vocabulary padding) are dropped before log-softmax,
    which runs in fp32.
  * Requests are sorted longest first and batched (``batch_size``, default 8; "auto" is not
    supported and falls back to 8), right-padded; the causal mask keeps padding out of every real
    position. A context + continuation longer than the sequence length is cut from the left.
  * ``generate_until`` is greedy; it stops at any ``until`` string, at EOD or after
    ``max_gen_toks`` (default 256). It runs on megatron-core's KV cache (static batching; without it
    at PP > 1 or under sequence parallelism): the batch
    is prefilled up to its shortest prompt, then advances one position per forward; rows whose
    prompt is longer read their prompt tokens until it ends. Generated text leaves out special
    tokens, as lm-eval's ``hf`` model does.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from dense_model import collectives

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8


class MegatronLM(TemplateLM):
    """lm-eval ``TemplateLM`` over a built megatron-core GPTModel (one pipeline stage) in eval mode."""

    def __init__(
        self,
        model,
        config,
        tokenizer,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        prefix_token_id: int | None = None,
    ) -> None:
        """``model``: the GPTModel (not DDP-wrapped); ``config``: our Config it was built from;
        ``tokenizer``: the training tokenizer (``dense_model.data.tokenizers``)."""
        super().__init__()
        self.batch_size = _batch_size(batch_size)
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.vocab_size = config.model.vocab_size
        if tokenizer.vocab_size > self.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {self.vocab_size}"
            )
        self.dtype = next(model.parameters()).dtype
        on_gpu = torch.cuda.is_available()
        self._device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        self._max_length = int(max_length or config.model.seq_length)
        self.max_gen_toks = int(max_gen_toks)
        self._prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        self._main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        self._layout(model)

    def _layout(self, model) -> None:
        """The parallel layout the forward follows (see the module docstring)."""
        from megatron.core import parallel_state as ps

        laid_out = torch.distributed.is_initialized() and ps.model_parallel_is_initialized()
        self._tp = ps.get_tensor_model_parallel_world_size() if laid_out else 1
        self._sequence_parallel = bool(getattr(model.config, "sequence_parallel", False)) and self._tp > 1
        self.pipeline_group = None  # set at PP > 1
        self.first_stage = self.last_stage = True
        if laid_out and ps.get_pipeline_model_parallel_world_size() > 1:
            self.pipeline_group = ps.get_pipeline_model_parallel_group()
            self.first_stage, self.last_stage = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
            self._prev_rank = ps.get_pipeline_model_parallel_prev_rank()
            self._next_rank = ps.get_pipeline_model_parallel_next_rank()
            self.last_stage_rank = ps.get_pipeline_model_parallel_last_rank()
            self._hidden = (model.config.hidden_size, model.config.pipeline_dtype or self.dtype)
        self._kv_cache = self.pipeline_group is None and not self._sequence_parallel

    # ---------------------------------------------------------------------------------- basics

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod

    @property
    def prefix_token_id(self) -> int:
        return self.eot_token_id if self._prefix_token_id is None else self._prefix_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.path

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids, skip_special_tokens: bool = True) -> str:
        # As lm-eval's hf model: generated text leaves out special tokens (a generated <unk> would
        # otherwise read " \u2047 " from SentencePiece and nothing from the exported HF tokenizer).
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    @torch.no_grad()
    def logits(self, sequences: list[list[int]]) -> torch.Tensor | None:
        """Full-vocabulary logits [b, s, vocab] (model dtype) of right-padded token sequences; None on
        a pipeline stage that is not the last."""
        return self._forward(_right_padded(sequences, self.eot_token_id), 0)

    def _forward(self, tokens: torch.Tensor, first_position: int, cache=None) -> torch.Tensor | None:
        """Logits [b, s, vocab] of ``tokens`` [b, s] at positions ``first_position``...; with a
        megatron ``StaticInferenceContext`` (``cache``), only the last position's, [b, 1, vocab].
        None on a pipeline stage that is not the last (it has sent its output to the next stage)."""
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

        tokens = tokens.to(self._device)
        b, s = tokens.shape
        if self._sequence_parallel and s % self._tp:  # the sequence is split over the TP ranks
            tokens = F.pad(tokens, (0, self._tp - s % self._tp), value=self.eot_token_id)
        length = tokens.shape[1]
        positions = torch.arange(first_position, first_position + length, device=self._device)
        positions = positions.expand(b, length)
        if not self.first_stage:
            self.model.set_input_tensor(self._receive(length, b))
        if cache is not None:  # megatron gathers the vocab-parallel logits itself in inference mode
            logits = self.model(tokens, positions, None, inference_context=cache, runtime_gather_output=True)
        else:
            # [b, length, padded_vocab / tp]; a stage that is not the last: hidden [length(/tp), b, h]
            logits = self.model(tokens, positions, None)
            if not self.last_stage:
                collectives.send(logits, self._next_rank, self.pipeline_group)
                return None
            if self._tp > 1:
                logits = gather_from_tensor_model_parallel_region(logits)  # [b, length, padded_vocab]
        return logits[:, :s, : self.vocab_size]

    def _receive(self, length: int, b: int) -> torch.Tensor:
        """The previous stage's output for a forward of ``b`` sequences of ``length`` tokens:
        [length (/ TP under sequence parallelism), b, hidden], as megatron's schedules pass it."""
        hidden, dtype = self._hidden
        rows = length // self._tp if self._sequence_parallel else length
        received = torch.empty(rows, b, hidden, dtype=dtype, device=self._device)
        collectives.recv_into(received, self._prev_rank, self.pipeline_group)
        return received

    # ---------------------------------------------------------------------------------- scoring

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """requests: [((context, continuation) or None, context_ids, continuation_ids)]."""
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])))
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm or not self._main, desc="loglikelihood")
        for batch in collator.get_batched(n=self.batch_size):
            inputs = []
            for _, context, continuation in batch:
                if len(continuation) > self.max_length:
                    raise ValueError(
                        f"a continuation of {len(continuation)} tokens is longer than the model's "
                        f"{self.max_length}-token window"
                    )
                inputs.append((context + continuation)[-(self.max_length + 1) :][:-1])
            logits = self.logits(inputs)  # [b, s, vocab]
            if logits is None:  # a pipeline stage that is not the last: the caller takes the last's
                results.extend([(0.0, False)] * len(batch))
                bar.update(len(batch))
                continue
            for row, ((request, _, continuation), seq) in enumerate(zip(batch, inputs)):
                end, k = len(seq), len(continuation)
                logprobs = F.log_softmax(logits[row, end - k : end].float(), dim=-1)  # [k, vocab]
                target = torch.tensor(continuation, device=logprobs.device)  # [k]
                score = float(logprobs.gather(-1, target[:, None]).sum())
                greedy = bool((logprobs.argmax(dim=-1) == target).all())
                results.append((score, greedy))
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, (score, greedy))
                bar.update(1)
        bar.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood in disjoint windows of max_length tokens (lm-eval's scheme)."""
        windows, owner = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            pairs = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (score, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[index] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation per request: stop strings (``until``), EOD, ``max_gen_toks``."""
        collator = Collator(
            [req.args for req in requests],
            sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
            group_by="gen_kwargs",
            group_fn=lambda a: a[1],
        )
        eod_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm or not self._main, desc="generate_until")
        for batch in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*batch)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            if kwargs.get("do_sample"):
                logger.warning("dense_model generates greedily; do_sample/temperature are ignored")
            until = handle_stop_sequences(kwargs.get("until"), eos=eod_text)
            texts = self._greedy(list(contexts), until, int(kwargs["max_gen_toks"]))
            for context, gen_kwargs, text in zip(contexts, all_kwargs, texts):
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(1)
        bar.close()
        return collator.get_original(results)

    @torch.no_grad()
    def _greedy(self, contexts: list[str], until: list[str], max_new: int) -> list[str]:
        from megatron.core.inference.contexts import StaticInferenceContext

        budget = self.max_length - max_new
        if budget <= 0:
            raise ValueError(
                f"max_gen_toks={max_new} leaves no room for a prompt in {self.max_length} tokens"
            )
        prompts = [self.tok_encode(c, left_truncate_len=budget) or [self.prefix_token_id] for c in contexts]
        lengths = [len(p) for p in prompts]
        total = max(lengths) + max_new  # <= max_length
        tokens = _right_padded(prompts, self.eot_token_id, total)  # [b, total], generated tokens go in
        generated: list[list[int]] = [[] for _ in prompts]
        done = [max_new <= 0] * len(prompts)
        cache = StaticInferenceContext(len(prompts), total) if self._kv_cache else None
        position, step = 0, min(lengths)  # prefill to the shortest prompt, then one position at a time
        while not all(done):
            if cache is not None:
                logits = self._forward(tokens[:, position : position + step], position, cache)
                predicted = logits[:, -1].argmax(-1)
                cache.sequence_len_offset += step
                cache.enable_decode_mode()
            else:  # the whole prefix again: the same last position as the cached step
                predicted = self._next_tokens(tokens[:, : position + step])
            position, step = position + step, 1
            for row, token in enumerate(predicted.tolist()):
                if done[row] or position < lengths[row]:  # finished, or still reading its prompt
                    continue
                if token == self.eot_token_id:
                    done[row] = True
                    continue
                generated[row].append(token)
                tokens[row, position] = token
                text = self.tok_decode(generated[row])
                done[row] = len(generated[row]) == max_new or any(stop and stop in text for stop in until)
        return [postprocess_generated_text(self.tok_decode(g), until, None) for g in generated]

    def _next_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The greedy next token [b] after each row of ``tokens`` [b, s], without a KV cache; at
        PP > 1 the last stage's, broadcast to the pipeline."""
        logits = self._forward(tokens, 0)
        if logits is not None:
            predicted = logits[:, -1].argmax(-1)
        else:
            predicted = torch.empty(tokens.shape[0], dtype=torch.long, device=self._device)
        if self.pipeline_group is not None:
            collectives.broadcast_tensor(predicted, self.last_stage_rank, self.pipeline_group)
        return predicted


def _right_padded(sequences: list[list[int]], pad: int, length: int | None = None) -> torch.Tensor:
    """[b, length] token ids: each sequence, then ``pad``."""
    tokens = torch.full((len(sequences), length or max(len(s) for s in sequences)), pad, dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return tokens


def _batch_size(value) -> int:
    if value is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(value, str) and value.startswith("auto"):
        logger.warning("dense_model: batch_size=%s is not supported; using %d", value, DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {value!r}")
    return size
