"""Data pipeline throughput on this machine: preparing shards, loading batches, and how far the
loader outruns training.

    python benchmarks/data_cpu.py [--batches 200] [--json OUT.json]

Prints
  - `prepare` throughput in MB/s of input text (the standard library, all cores);
  - raw loader tokens/s for one process, from the shards: the packing source alone, and the
    whole pipeline (grain read-ahead + global jax.Arrays);
  - gpt-124m train tokens/s on this CPU (one device, one 1024-token sequence per step) and the
    ratio loader / training (the aim is >= 20: data must never be the bottleneck).
Not a test: nothing asserts, the figures go to the closing notes and the README.
"""

import argparse
import json
import statistics
import tempfile
import time

import jax

from jaxlm import config as config_lib
from jaxlm import mesh as mesh_lib
from jaxlm import training
from jaxlm.data import corpus, loader, prepare, tokenizer
from jaxlm.data.orders import PackedOrder
from jaxlm.data.pipeline import PackedBatches
from jaxlm.data.shards import PreparedSplit
from jaxlm.sharding import batch_sharding

SEQ_LEN, BATCH = 1024, 32  # gpt-124m windows


def prepare_throughput(vocab_size: int, workdir: str) -> dict:
    inputs = corpus.stdlib_inputs()
    start = time.perf_counter()
    model = tokenizer.train(inputs.documents(), vocab_size, f"{workdir}/tok.model")
    tokenizer_s = time.perf_counter() - start
    start = time.perf_counter()
    manifest = prepare.prepare(inputs, model, f"{workdir}/data", val_fraction=0.01)
    seconds = time.perf_counter() - start
    return {
        "input_mb": inputs.total_bytes / 1e6,
        "tokenizer_s": tokenizer_s,
        "prepare_s": seconds,
        "prepare_mb_per_s": inputs.total_bytes / 1e6 / seconds,
        "tokens": manifest["tokens"]["train"],
    }


def loader_throughput(directory: str, batches: int, mesh) -> dict:
    order = PackedOrder(PreparedSplit(directory, "train"), seq_len=SEQ_LEN, seed=0)
    source = PackedBatches(order, global_batch=BATCH)
    start = time.perf_counter()
    for i in range(batches):
        source[i]
    raw = batches * BATCH * SEQ_LEN / (time.perf_counter() - start)

    cfg = config_lib.load(
        "gpt-124m",
        [
            f"data.source={directory}",
            f"train.seq_len={SEQ_LEN}",
            f"train.global_batch_size={BATCH}",
        ],
    )
    pipeline = loader.make_batches(cfg, batch_sharding(mesh))
    next(pipeline)
    start = time.perf_counter()
    for _ in range(batches):
        jax.block_until_ready(next(pipeline))
    full = batches * BATCH * SEQ_LEN / (time.perf_counter() - start)
    return {"source_tokens_per_s": raw, "pipeline_tokens_per_s": full}


def train_throughput(directory: str, mesh, steps: int = 4) -> float:
    cfg = config_lib.load(
        "gpt-124m",
        [
            f"data.source={directory}",
            "train.global_batch_size=1",
            f"train.seq_len={SEQ_LEN}",
            f"train.steps={steps}",
            "train.eval_every=0",
        ],
    )
    rows = training.run(cfg, mesh)
    return statistics.median(r["tokens_per_s"] for r in rows[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    mesh = mesh_lib.make_mesh("dp=1", jax.devices()[:1])

    with tempfile.TemporaryDirectory() as workdir:
        prep = prepare_throughput(50304, workdir)
        print(
            f"prepare: {prep['input_mb']:.1f} MB in {prep['prepare_s']:.1f} s = "
            f"{prep['prepare_mb_per_s']:.1f} MB/s ({prep['tokens']:,} tokens; tokenizer "
            f"training {prep['tokenizer_s']:.1f} s)"
        )
        loader = loader_throughput(f"{workdir}/data", args.batches, mesh)
        print(
            f"loader, one process: packing source {loader['source_tokens_per_s'] / 1e6:.1f} M "
            f"tokens/s, whole pipeline {loader['pipeline_tokens_per_s'] / 1e6:.1f} M tokens/s"
        )
        step = train_throughput(f"{workdir}/data", mesh)
        ratio = loader["pipeline_tokens_per_s"] / step
        print(
            f"gpt-124m training consumes {step:,.0f} tokens/s on this CPU: the loader is "
            f"{ratio:,.0f}x faster (aim >= 20x)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**prep, **loader, "train_tokens_per_s": step, "ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
