"""Megatron-format data at scale, on this machine: GPTDataset's indices for 10^7 documents, a blend
of hundreds of prefixes opened lazily, and the loader against what gpt-1.3b training consumes.

    python benchmarks/data_megatron.py [--documents 10000000] [--prefixes 300] [--json OUT.json]

Prints
  - the Megatron-order index of `--documents` documents (lengths 1..2047, the .bin a sparse
    file): build seconds, the process's peak resident memory for it, the reopening seconds
    (a cache hit) and the size of the cached files;
  - a blend of `--prefixes` Megatron prefixes: open file descriptors and resident memory after
    opening it, after one global batch and after 50;
  - loader tokens/s of one process for gpt-1.3b's batch (512 x 1024) from a 10^8-token prefix,
    jaxlm's order and Megatron's, and the ratio to what gpt-1.3b training consumes on 8 H100s
    at 50 % MFU (the aim is >= 20: data must never be the bottleneck).
Not a test: nothing asserts, the figures go to the closing notes and the README.
"""

import argparse
import json
import os
import resource
import tempfile
import time

import numpy as np

from jaxlm import config as config_lib
from jaxlm.cost import flops, hardware
from jaxlm.data import indexed, megatron_order, orders, sources
from jaxlm.data.pipeline import PackedBatches

SEQ_LEN, BATCH = 1024, 512  # gpt-1.3b's
GPUS, MFU = 8, 0.5


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def sparse_prefix(prefix: str, lengths: np.ndarray) -> None:
    """A Megatron prefix of these lengths whose .bin is a hole: only the index is real."""
    indexed.write_index(prefix, lengths, np.uint16)
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(int(lengths.sum(dtype=np.int64)) * 2)


def index_build(workdir: str, documents: int) -> dict:
    lengths = np.random.default_rng(0).integers(1, 2048, documents).astype(np.int32)
    sparse_prefix(f"{workdir}/big", lengths)
    split = sources.MegatronSplit(f"{workdir}/big", "train", megatron_order.DEFAULT_SPLIT)
    samples = split.num_tokens // SEQ_LEN  # one epoch of gpt-1.3b windows
    before_peak, before = peak_rss_mb(), rss_mb()
    start = time.perf_counter()
    kw = dict(seq_len=SEQ_LEN, num_samples=samples, seed=1234, cache_dir=f"{workdir}/cache")
    order = megatron_order.GPTOrder(split, **kw)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    again = megatron_order.GPTOrder(split, **kw)
    again.window(len(again) - 1)
    reopen_s = time.perf_counter() - start
    cached = sum(os.path.getsize(f"{workdir}/cache/{f}") for f in os.listdir(f"{workdir}/cache"))
    return {
        "documents": documents,
        "tokens": int(lengths.sum(dtype=np.int64)),
        "samples": len(order),
        "build_s": build_s,
        "build_peak_rss_mb": max(peak_rss_mb() - before_peak, 0.0),
        "rss_before_mb": before,
        "reopen_s": reopen_s,
        "cache_mb": cached / 1e6,
    }


def lazy_blend(workdir: str, prefixes: int) -> dict:
    rng = np.random.default_rng(1)
    text = []
    for i in range(prefixes):
        docs = [rng.integers(1, 50000, rng.integers(100, 3000)) for _ in range(100)]
        indexed.write(f"{workdir}/p{i:04d}", docs, np.uint16)
        text += ["1", f"megatron:{workdir}/p{i:04d}"]
    cfg = config_lib.load("gpt-1.3b", [f"data.source={' '.join(text)}"])
    fds, rss = open_fds(), rss_mb()
    found = sources.resolve(cfg.data, cfg.model.vocab_size)
    order = orders.make_order(
        found, "train", cfg.data, seq_len=SEQ_LEN, seed=0, num_samples=BATCH * 100
    )
    batches = PackedBatches(order, global_batch=BATCH)
    row = {"prefixes": prefixes, "fds_before": fds, "rss_before_mb": rss}
    row |= {"fds_opened": open_fds(), "rss_opened_mb": rss_mb()}
    batches[0]
    row |= {"fds_one_batch": open_fds(), "rss_one_batch_mb": rss_mb()}
    for i in range(1, 50):
        batches[i]
    row |= {"fds_50_batches": open_fds(), "rss_50_batches_mb": rss_mb()}
    return row


def throughput(workdir: str, batches: int) -> dict:
    rng = np.random.default_rng(2)
    prefix = f"{workdir}/corpus"
    indexed.write(
        prefix, (rng.integers(1, 50000, n) for n in rng.integers(100, 3000, 65_000)), np.uint16
    )
    cfg = config_lib.load("gpt-1.3b", [f"data.source=megatron:{prefix}"])
    found = sources.resolve(cfg.data, cfg.model.vocab_size)
    row = {"corpus_tokens": indexed.IndexedDataset(prefix).num_tokens}
    for name in ("jaxlm", "megatron"):
        data = config_lib.apply_overrides(
            cfg, [f"data.order={name}", f"data.cache_dir={workdir}/cache"]
        ).data
        order = orders.make_order(
            found, "train", data, seq_len=SEQ_LEN, seed=0, num_samples=BATCH * batches
        )
        source = PackedBatches(order, global_batch=BATCH)
        source[0]
        start = time.perf_counter()
        for i in range(1, batches):
            source[i]
        row[f"{name}_tokens_per_s"] = (
            (batches - 1) * BATCH * SEQ_LEN / (time.perf_counter() - start)
        )
    return row


def gpt13b_consumption() -> float:
    """Tokens/s of gpt-1.3b training on 8 H100s at 50 % MFU (model FLOPs)."""
    import jax

    from jaxlm import mesh as mesh_lib
    from jaxlm import model as model_lib
    from jaxlm.sharding import ActivationSharding

    cfg = config_lib.load("gpt-1.3b", [])
    mesh = mesh_lib.make_mesh("dp=1", jax.devices()[:1])
    shapes = model_lib.describe(cfg.model, ActivationSharding(mesh)).shapes
    per_token = flops.model_flops_per_token_of(cfg, shapes)
    return GPUS * hardware.device("h100").peak_tflops * 1e12 * MFU / per_token


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=10_000_000)
    parser.add_argument("--prefixes", type=int, default=300)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        b = results["index"] = index_build(workdir, args.documents)
        print(
            f"index of {b['documents']:,} documents ({b['tokens'] / 1e9:.1f} G tokens, "
            f"{b['samples']:,} samples of {SEQ_LEN}): built in {b['build_s']:.1f} s "
            f"(peak resident memory +{b['build_peak_rss_mb']:.0f} MB), reopened in "
            f"{b['reopen_s'] * 1e3:.0f} ms, {b['cache_mb']:.0f} MB cached"
        )
    with tempfile.TemporaryDirectory() as workdir:
        z = results["blend"] = lazy_blend(workdir, args.prefixes)
        print(
            f"blend of {z['prefixes']} prefixes: open files {z['fds_before']} -> "
            f"{z['fds_opened']} opened -> {z['fds_one_batch']} after one batch -> "
            f"{z['fds_50_batches']} after 50; resident memory {z['rss_before_mb']:.0f} -> "
            f"{z['rss_opened_mb']:.0f} -> {z['rss_one_batch_mb']:.0f} -> "
            f"{z['rss_50_batches_mb']:.0f} MB"
        )
    with tempfile.TemporaryDirectory() as workdir:
        t = results["loader"] = throughput(workdir, args.batches)
    need = results["gpt13b_8xh100_tokens_per_s"] = gpt13b_consumption()
    for name in ("jaxlm", "megatron"):
        rate = t[f"{name}_tokens_per_s"]
        results[f"{name}_ratio"] = rate / need
        print(
            f"loader, {name} order, one process: {rate / 1e6:.1f} M tokens/s = "
            f"{rate / need:.1f}x what gpt-1.3b consumes on {GPUS} H100s at {MFU:.0%} MFU "
            f"({need / 1e3:,.0f} k tokens/s; aim >= 20x)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
