"""Shared helpers of the data tests."""

from dense_model.data.preprocess import PreprocessConfig


def preprocess_config(spm_model, prefix, inputs=(), **kw) -> PreprocessConfig:
    """A PreprocessConfig for the session's SentencePiece model: EOD appended, no progress bar."""
    base = dict(
        inputs=list(inputs),
        output_prefix=str(prefix),
        tokenizer_type="sentencepiece",
        tokenizer_model=spm_model,
        append_eod=True,
        progress=False,
    )
    base.update(kw)
    return PreprocessConfig(**base)
