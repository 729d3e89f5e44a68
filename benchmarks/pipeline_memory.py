"""XLA's memory of the pipelined train step against the number of microbatches.

    python benchmarks/pipeline_memory.py [--microbatches 8 16 32 64] [--repeats 1 2]
                                         [--remat full none] [--dtype bfloat16 float16]
                                         [--schedule gpipe 1f1b] [--whole-loss]
                                         [--json OUT.json]

d_model 512, 8 layers, seq 512, pp=4 on 4 fake CPU devices, one sequence per microbatch (the
global batch is M sequences), for `model.remat` full and none. For each M it compiles the
train step (nothing runs) and prints XLA's temporaries per device next to the arithmetic's
stage inputs (jaxlm/cost/memory.py), then the slope of a least-squares line through the
temporaries: MB per microbatch. GPipe keeps, per stage and microbatch, what the recomputation
policy saves for its L / S layers; with `remat=full` that is each layer's input, 2 layers x
512 x 512 in bfloat16 = 1 MB here. The loss runs in one chunk per microbatch
(`train.loss_chunks=M`), so that the head's logits of one sequence are alive at a time;
`--whole-loss` runs it on the whole batch at once, whose logits then grow with M too.
XLA:CPU widens bfloat16 dynamic slices to float32 and hoists the widening of the whole residual
stack out of the backward loop (jaxlm/model/pipeline.py), so in bfloat16 the CPU's slope is
about three times the residuals'; float16, which the CPU keeps as it is, shows the pipeline's
own.
With `--schedule gpipe 1f1b` it also prints 1F1B's temporaries beside GPipe's at each M, and
1F1B's activation share: what it holds beyond GPipe's fixed part (the intercept of GPipe's line
through M), as a fraction of GPipe's activations at that M, next to S / M.
Not a test: nothing asserts; the table goes to the notes.
"""

import argparse
import json

import jax

jax.config.update("jax_num_cpu_devices", 4)

from jaxlm import config as config_lib  # noqa: E402
from jaxlm import mesh as mesh_lib  # noqa: E402
from jaxlm.cost import compiled, memory  # noqa: E402
from jaxlm.step import build_program  # noqa: E402

MB = 1e6
SHAPE = [
    "model.d_model=512",
    "model.n_layers=8",
    "model.n_heads=8",
    "model.d_ff=2048",
    "train.seq_len=512",
    "model.max_seq_len=512",
    "data.source=synthetic",
]


def figures(
    microbatches: int,
    remat: str,
    repeats: int,
    chunks: int,
    mesh,
    dtype: str = "bfloat16",
    schedule: str = "gpipe",
) -> dict:
    if schedule == "gpipe" and repeats > 1:
        schedule = "circular"
    if schedule == "1f1b":
        chunks = 1  # its head runs on one microbatch at a time anyway
    cfg = config_lib.load(
        None,
        [
            *SHAPE,
            f"model.compute_dtype={dtype}",
            f"model.remat={remat}",
            f"train.global_batch_size={microbatches}",
            f"train.microbatches={microbatches}",
            f"train.pipeline_repeats={repeats}",
            f"train.pipeline_schedule={schedule}",
            f"train.loss_chunks={chunks}",
        ],
    )
    program = build_program(cfg, mesh)
    step = compiled.compile_step(cfg, program)
    m = cfg.model
    c = 4 if m.compute_dtype == "float32" else 2
    # what GPipe must keep per stage and microbatch with full recomputation: each layer's input
    stage_inputs = m.n_layers // program.stages.stages * cfg.train.seq_len * m.d_model * c
    return {
        "schedule": schedule,
        "dtype": dtype,
        "remat": remat,
        "repeats": repeats,
        "microbatches": microbatches,
        "loss_chunks": cfg.train.loss_chunks,
        "temp_mb": step.memory["temp"] / MB,
        "arithmetic_activations_mb": memory.activation_bytes(cfg, program, mesh) / MB,
        "arithmetic_pipeline_weights_mb": memory.pipeline_weight_bytes(cfg, program) / MB,
        "stage_inputs_per_microbatch_mb": stage_inputs / MB,
        "collective_mb": {k: v / MB for k, v in step.collective_bytes.items()},
    }


def slope(xs, ys) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def table(
    microbatches: list[int],
    remat: str,
    repeats: int,
    whole_loss: bool,
    mesh,
    dtype: str,
    schedule: str = "gpipe",
) -> list:
    loss = "1" if whole_loss or schedule == "1f1b" else "M"
    print(f"{schedule}: {dtype}, remat={remat}, pipeline_repeats={repeats}, loss_chunks={loss}")
    print(f"{'M':>4} {'XLA temp MB':>12} {'arithmetic MB':>14} {'collectives MB':>40}")
    rows = []
    for m in microbatches:
        row = figures(m, remat, repeats, 1 if whole_loss else m, mesh, dtype, schedule)
        rows.append(row)
        coll = ", ".join(f"{k} {v:.0f}" for k, v in sorted(row["collective_mb"].items()))
        # the arithmetic's temporaries: activations and the stage's weight-sized buffers
        arithmetic = row["arithmetic_activations_mb"] + row["arithmetic_pipeline_weights_mb"]
        print(f"{m:>4} {row['temp_mb']:>12.1f} {arithmetic:>14.1f} {coll:>40}", flush=True)
    per = slope([r["microbatches"] for r in rows], [r["temp_mb"] for r in rows])
    need = rows[0]["stage_inputs_per_microbatch_mb"]
    print(
        f"slope {per:.2f} MB per microbatch; stage inputs per microbatch {need:.2f} MB "
        f"(ratio {per / need:.2f})\n"
    )
    return rows


def compare(gpipe: list, one_f_one_b: list, stages: int) -> None:
    """1F1B's temporaries against GPipe's: GPipe's are a fixed part (the intercept of its line
    through M) plus its activations, slope x M; 1F1B's activation share is what it holds
    beyond that fixed part, to be at most (S / M) x GPipe's activations = S x slope."""
    xs = [r["microbatches"] for r in gpipe]
    per = slope(xs, [r["temp_mb"] for r in gpipe])
    fixed = gpipe[0]["temp_mb"] - per * xs[0]
    print(f"GPipe: fixed part {fixed:.1f} MB + {per:.2f} MB per microbatch")
    print(
        f"{'M':>4} {'GPipe MB':>9} {'1F1B MB':>8} {'1F1B/GPipe':>10} "
        f"{'bound: fixed + S/M x GPipe activations':>39} {'holds':>6}"
    )
    for g, f in zip(gpipe, one_f_one_b, strict=True):
        m = g["microbatches"]
        bound = fixed + stages / m * per * m
        print(
            f"{m:>4} {g['temp_mb']:>9.1f} {f['temp_mb']:>8.1f} "
            f"{f['temp_mb'] / g['temp_mb']:>10.3f} {bound:>39.1f} "
            f"{'yes' if f['temp_mb'] <= bound else 'NO':>6}"
        )
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--microbatches", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--remat", nargs="+", default=["full", "none"])
    p.add_argument("--repeats", type=int, nargs="+", default=[1], help="pipeline rounds R")
    p.add_argument("--dtype", nargs="+", default=["bfloat16"], help="model.compute_dtype")
    p.add_argument("--whole-loss", action="store_true", help="the loss in one piece")
    p.add_argument(
        "--schedule", nargs="+", default=["gpipe"], help="gpipe (circular with R > 1), 1f1b"
    )
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    mesh = mesh_lib.make_mesh("pp=4")
    rows = []
    for dtype in args.dtype:
        for repeats in args.repeats:
            for remat in args.remat:
                pair = {}
                for schedule in args.schedule:
                    pair[schedule] = table(
                        args.microbatches, remat, repeats, args.whole_loss, mesh, dtype, schedule
                    )
                    rows += pair[schedule]
                if {"gpipe", "1f1b"} <= set(pair):
                    compare(pair["gpipe"], pair["1f1b"], mesh.shape["pipeline"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
