"""Data: tokenizer, prepared shards and the pipeline that turns them into global batches.

    corpus      input files, directories, globs and JSONL -> documents
    tokenizer   SentencePiece: train, load, fingerprint
    prepare     documents -> tokenized, committed shards (python -m jaxlm.data prepare)
    shards      reading prepared shards: manifest, splits, CRC checks
    stdlib      the default corpus, built into a cache on first use
    pipeline    grain: packing documents into windows, global arrays
    synthetic   Markov-chain batches generated on the devices
    loader      `data.source` -> checked source -> the iterator of global batches training uses

Nothing in this package but `loader`, `pipeline` and `synthetic` imports JAX, so the data
commands and the tokenizing worker processes start without it.
"""
