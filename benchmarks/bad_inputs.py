"""A sweep of the mistakes users make, across every command: how many are refused cleanly.

    python benchmarks/bad_inputs.py [--checkout DIR] [--only SUBSTRING] [--json OUT.json]

Each case runs `python -m jaxlm.<command> ...` in a fresh copy of a workspace that holds a
trained tiny run, its prepared data with another tokenizer's fingerprint, a config file that is
not UTF-8 and a few other traps. A case is *clean* when the command exits 2, prints one
sentence (`error: ...`, or argparse's `prog: error: ...` after its usage lines) and no
traceback, and leaves every file of the workspace as it was. Anything else is counted by what
happened: a traceback, exit 0 (nonsense accepted), another exit code, files written, or a
timeout. `--checkout` runs the code of another checkout (e.g. a git worktree of an older
commit) against the same cases, for a before/after count. Not a test: it prints the counts.
"""

import argparse
import collections
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import yaml

from jaxlm.data import indexed

TINY = ["--config", "tiny", "train.steps=2", "data.source=synthetic", "log.tensorboard=false"]


def train(*args):
    return ["train", *TINY, "--out", "out", *args]


def on_one_device(command, *args):
    """plan or bench of the tiny preset on one device."""
    return [command, "--config", "tiny", "--mesh", "dp=1", *args]


def tune(*args):
    return ["tune", "--config", "tiny", "--devices", "8", *args]


def generate(*args):
    return ["generate", "--run", "run", "--prompt", "a", *args]


CASES = {
    # config values out of their domain
    "negative learning rate": train("train.lr=-1"),
    "NaN learning rate": train("train.lr=nan"),
    "beta1 of 1": train("train.beta1=1.0"),
    "negative beta2": train("train.beta2=-0.1"),
    "negative epsilon": train("train.adam_eps=-1e-8"),
    "negative clip norm": train("train.grad_clip=-1"),
    "keep no checkpoint": train("checkpoint.keep=0"),
    "negative checkpoint interval": train("checkpoint.every=-5"),
    "negative validation interval": train("train.eval_every=-1"),
    "log every 0 steps": train("log.every=0"),
    "zero kv heads": train("model.n_kv_heads=0"),
    "zero head_dim": train("model.head_dim=0"),
    "zero micro batch": train("train.micro_batch_size=0"),
    "huge sequence, rotary": train("train.seq_len=100000"),
    "sequence over the context": train("train.seq_len=512"),
    "negative warmup": train("train.warmup_steps=-3"),
    "min_lr_ratio of 2": train("train.min_lr_ratio=2"),
    "negative weight decay": train("train.weight_decay=-0.1"),
    "spike window of 1": train("train.spike_window=1", "train.spike_sigma=3"),
    "straggler margin of 0": train("train.straggler_margin=0"),
    "slow factor below 1": train("debug.slow_process=0", "debug.slow_factor=0.5"),
    "slow process not in the launch": train("debug.slow_process=3"),
    "zero bad steps allowed": train("train.max_bad_steps=0"),
    "time limit 'abc'": train("train.time_limit=abc"),
    "zero peak TFLOP/s": train("train.peak_tflops=0"),
    "zero prefetch": train("data.prefetch=0"),
    "negative reader threads": train("data.threads=-1"),
    "zero norm epsilon": train("model.norm_eps=0"),
    "negative init std": train("model.init_std=-0.02"),
    "zero loss scale": train("train.loss_scale=0"),
    "zero vocabulary": train("model.vocab_size=0"),
    "zero decay steps": train("train.decay_steps=0"),
    "negative carbon intensity": train("log.carbon_intensity=-1"),
    "zero init timeout": train("distributed.init_timeout=0"),
    "negative seed": train("train.seed=-1"),
    "steps 'abc'": train("train.steps=abc"),
    "misspelt key": train("trian.steps=5"),
    "empty mesh": train("mesh="),
    "missing data directory": train("data.source=nowhere"),
    # blends and Megatron datasets
    "negative blend weight": train("data.source=-1 megatron:mega 1 foreign"),
    "NaN blend weight": train("data.source=nan megatron:mega 1 foreign"),
    "blend weights all zero": train("data.source=0 megatron:mega 0 foreign"),
    "blend names a source twice": train("data.source=1 megatron:mega 1 megatron:mega"),
    "Megatron prefix without .bin": train("data.source=megatron:nobin"),
    "Megatron prefix without .idx": train("data.source=megatron:noidx"),
    "Megatron index of another format": train("data.source=megatron:badmagic"),
    "Megatron index of version 2": train("data.source=megatron:version2"),
    "Megatron dtype code 9": train("data.source=megatron:dtype9"),
    "Megatron .bin shorter than its index": train("data.source=megatron:short"),
    "Megatron tokens beyond the vocabulary": train("data.source=megatron:bigvocab"),
    "split with no shares": train("data.source=megatron:mega", "data.split=0,0,0"),
    "inspect nowhere": ["data", "inspect", "megatron:nowhere"],
    # the command line of train
    "zero CPU devices": train("--cpu-devices", "0"),
    "mesh that does not fit": train("--mesh", "dp=3"),
    "unknown preset": ["train", "--config", "gpt-125m", "--out", "out"],
    "config not UTF-8": ["train", "--config", "latin1.yaml", "--out", "out"],
    "config not a mapping": ["train", "--config", "list.yaml", "--out", "out"],
    "run directory under a file": ["train", *TINY, "--out", "a-file/run"],
    "resume with another model": ["train", *TINY, "--out", "run", "model.d_ff=256"],
    # plan and tune
    "negative MFU": on_one_device("plan", "--mfu", "-0.4"),
    "MFU of 0": on_one_device("plan", "--mfu", "0"),
    "negative token budget": on_one_device("plan", "--tokens=-1e9"),
    "plan on 0 devices": on_one_device("plan", "--devices", "0"),
    "tune 0 trials": tune("--max-trials", "0"),
    "negative device memory": tune("--device-memory", "-1"),
    # bench
    "negative warm-up": on_one_device("bench", "--warmup", "-1"),
    "zero timed steps": on_one_device("bench", "--steps", "0"),
    "bench --out under a file": on_one_device("bench", "--out", "a-file/r.json"),
    "bench --out not a list": on_one_device("bench", "--out", "listless.json"),
    "missing PyTorch result": on_one_device("bench", "--pytorch", "no.json"),
    # generate
    "generate 0 tokens": generate("--max-new-tokens", "0"),
    "top-p of 0": generate("--top-p", "0"),
    "negative temperature": generate("--temperature", "-1"),
    "generate from no run": ["generate", "--run", "nowhere", "--prompt", "a"],
    "generate from a missing step": generate("--step", "999"),
    # eval
    "evaluate 0 batches": ["eval", "--run", "run", "--batches", "0"],
    "eval --json under a file": ["eval", "--run", "run", "--json", "a-file/e.json"],
    "eval on another tokenizer's data": [
        "eval",
        "--run",
        "run",
        "--data",
        "foreign",
        "--batches",
        "1",
    ],
    "eval on a pipeline mesh": ["eval", "--run", "run", "--mesh", "pp=2,dp=4"],
    # data
    "vocabulary of 0": [
        "data",
        "tokenizer",
        "--input",
        "text.txt",
        "--vocab-size",
        "0",
        "--out",
        "t.model",
    ],
    "tokenizer --out under a file": [
        "data",
        "tokenizer",
        "--input",
        "text.txt",
        "--vocab-size",
        "64",
        "--out",
        "a-file/t.model",
    ],
    "prepare --out is a file": [
        "data",
        "prepare",
        "--input",
        "text.txt",
        "--tokenizer",
        "run/tokenizer.model",
        "--out",
        "text.txt",
    ],
    "validation fraction 1.5": [
        "data",
        "prepare",
        "--input",
        "text.txt",
        "--tokenizer",
        "t.model",
        "--out",
        "d",
        "--val-fraction",
        "1.5",
    ],
    "no input files": [
        "data",
        "prepare",
        "--input",
        "nothing*",
        "--tokenizer",
        "t.model",
        "--out",
        "d",
    ],
    # launch and convert
    "launch 0 processes": ["launch", "local", "-n", "0", "--", "true"],
    "launch an unknown module": ["launch", "local", "--module", "nope", "--", "true"],
    "export over a file": ["convert", "to-hf", "run", "--out", "text.txt"],
    "import from nowhere": ["convert", "from-hf", "nowhere", "--out", "imported"],
}


def make_workspace(root: pathlib.Path, env: dict) -> None:
    """The files the cases find: a trained run, traps, and the run's data re-fingerprinted."""
    root.mkdir()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxlm.train",
            "--config",
            "tiny",
            "train.steps=2",
            "log.tensorboard=false",
            "--out",
            "run",
        ],
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
    )
    vocab = yaml.safe_load((root / "run" / "config.yaml").read_text())["model"]["vocab_size"]
    source = next(pathlib.Path(env["JAXLM_CACHE"]).glob(f"stdlib-*-v{vocab}"))
    shutil.copyfile(source / "tokenizer.model", root / "run" / "tokenizer.model")
    shutil.copytree(source, root / "foreign")
    manifest = json.loads((root / "foreign" / "manifest.json").read_text())
    manifest["tokenizer_sha256"] = "0" * 64
    (root / "foreign" / "manifest.json").write_text(json.dumps(manifest))
    (root / "latin1.yaml").write_bytes("train:\n  lr: 1.0e-3  # d\xe9faut\n".encode("latin-1"))
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "a-file").write_text("")
    (root / "listless.json").write_text("{}")
    (root / "text.txt").write_text("def hello():\n    print('hello')\n" * 50)
    make_megatron_traps(root, vocab)


def make_megatron_traps(root: pathlib.Path, vocab: int) -> None:
    """A good Megatron prefix `mega` and damaged copies of it, one fault each."""
    rng = np.random.default_rng(0)
    documents = [rng.integers(1, vocab, rng.integers(50, 500)) for _ in range(400)]
    indexed.write(root / "mega", documents, np.uint16)
    indexed.write(root / "bigvocab", [np.array([1, 2, vocab + 5])] * 400, np.uint16)

    def copy(name, patch=None, *, drop=None, cut=0):
        for suffix in (".bin", ".idx"):
            if suffix != drop:
                shutil.copyfile(root / f"mega{suffix}", root / f"{name}{suffix}")
        if patch:
            with open(root / f"{name}.idx", "r+b") as f:
                f.seek(patch[0])
                f.write(patch[1])
        if cut:
            with open(root / f"{name}.bin", "r+b") as f:
                f.truncate((root / f"{name}.bin").stat().st_size - cut)

    copy("nobin", drop=".bin")
    copy("noidx", drop=".idx")
    copy("badmagic", (0, b"NOTMAGIC!"))
    copy("version2", (9, (2).to_bytes(8, "little")))
    copy("dtype9", (17, bytes([9])))
    copy("short", cut=10)


def snapshot(root: pathlib.Path) -> dict:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def classify(result, changed: bool) -> str:
    err = result.stderr.strip().splitlines()
    if result.returncode is None:
        return "timeout"
    if "Traceback" in result.stderr:
        return "traceback"
    if result.returncode == 0:
        return "exit 0"
    if result.returncode != 2:
        return f"exit {result.returncode}"
    if changed:
        return "exit 2, files written"
    errors = [line for line in err if line.startswith("error:") or ": error: " in line]
    return "clean" if len(errors) == 1 and err[-1] == errors[0] else "exit 2, unclear"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkout", type=pathlib.Path, default=pathlib.Path(__file__).parents[1])
    p.add_argument("--only", default="", help="run the cases whose name holds this")
    p.add_argument("--timeout", type=float, default=120, help="seconds per case")
    p.add_argument("--json", type=pathlib.Path, help="also write the outcomes here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        env = {
            **os.environ,
            "PYTHONPATH": str(args.checkout.resolve()),
            "JAX_PLATFORMS": "cpu",
            "JAX_NUM_CPU_DEVICES": "8",
            "JAXLM_CACHE": str(tmp / "cache"),
        }
        make_workspace(tmp / "template", env)
        before = snapshot(tmp / "template")
        outcomes = {}
        for name, argv in CASES.items():
            if args.only not in name:
                continue
            work = tmp / "case"
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(tmp / "template", work)
            command = [sys.executable, "-m", f"jaxlm.{argv[0]}", *argv[1:]]
            try:
                result = subprocess.run(
                    command, cwd=work, env=env, capture_output=True, text=True, timeout=args.timeout
                )
            except subprocess.TimeoutExpired as e:
                result = subprocess.CompletedProcess(command, None, e.stdout or "", e.stderr or "")
            outcome = classify(result, snapshot(work) != before)
            last = (result.stderr or "").strip().splitlines()[-1:] or [""]
            outcomes[name] = {"outcome": outcome, "argv": argv, "last_line": last[0][:200]}
            print(f"{outcome:22} {name}: {last[0][:110]}", flush=True)
    counts = collections.Counter(o["outcome"] for o in outcomes.values())
    print(
        f"{counts['clean']} of {len(outcomes)} clean; "
        + ", ".join(f"{n} {k}" for k, n in counts.most_common() if k != "clean")
    )
    if args.json:
        args.json.write_text(json.dumps({"counts": counts, "cases": outcomes}, indent=1) + "\n")


if __name__ == "__main__":
    main()
