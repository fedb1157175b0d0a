"""Data: tokenizers, RedPajama JSONL -> Megatron mmap preprocessing, blends, and dataset building.

Map of the package:

| module | what it is for |
|---|---|
| `tokenizers` | `build_tokenizer("sentencepiece" or "huggingface", path)`: encode/decode, eod/pad, megatron-ready |
| `jsonl` | input discovery (files, folders, globs), plain/zstd/gzip readers, bad-line accounting, subsets |
| `indexed` | the .idx layout: write a shard index, read a header, stream-merge datasets (`merge_datasets`) |
| `preprocess/` | the preprocessing run, a module per stage: plan, shard, pool, workdir and claims, merge, run, cli |
| `blend` | the blend file (`PREFIX_blend.json`): write, `load_blend`, RedPajama-1T proportions |
| `gpt_dataset` | `build_gpt_datasets(...)`: megatron-core `BlendedMegatronDatasetBuilder` over GPTDataset |
| `inspect` | `inspect_dataset(prefix)`: counts, dtype, decoded samples, .bin/.idx consistency |
| `train_tokenizer` | train a SentencePiece model from the same JSONL inputs (bounded document sample) |
| `demo` | `prepare_demo_dataset(work_dir)`: tokenizer + blend of `examples/redpajama_sample`, cached |

Command-line tools live in `toolkits/pretrain_data_preprocessing/`.
"""
