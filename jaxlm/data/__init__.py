"""Data: tokenizer, prepared shards, Megatron-LM datasets, blends, and the pipeline that turns
them into global batches.

    corpus          input files, directories, globs and JSONL -> documents
    tokenizer       SentencePiece: train, load, fingerprint
    prepare         documents -> tokenized shards, or a Megatron prefix (python -m jaxlm.data)
    shards          reading prepared shards: manifest, splits, CRC checks
    indexed         Megatron-LM's PREFIX.bin + PREFIX.idx, read and written with NumPy
    stdlib          the default corpus, built into a cache on first use
    blend           data.source as weighted sources; Megatron's blending rule
    sources         data.source resolved and checked; one split of a source as documents
    megatron_order  Megatron GPTDataset's document, sample and shuffle indices, cached
    orders          which documents make sample i: jaxlm's packing, Megatron's, a blend
    pipeline        grain: rows of global batches, global arrays
    synthetic       Markov-chain batches generated on the devices
    loader          `data.source` -> checked sources -> the iterator of global batches training uses

Nothing in this package but `loader`, `pipeline` and `synthetic` imports JAX, so the data
commands and the tokenizing worker processes start without it.
"""
