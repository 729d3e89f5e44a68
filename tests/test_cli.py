"""`python -m jaxlm.train` as a user runs it: outputs on success, one sentence and exit 2 on
every mistake a user can make."""

import argparse
import importlib
import json
import os
import subprocess
import sys

import pytest
import yaml

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"}


def train(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.train", *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=300,
    )


@pytest.mark.slow
def test_a_run_writes_metrics_tensorboard_and_its_config(tmp_path):
    """The tiny preset on the default corpus (the standard library, built into the cache)."""
    out = tmp_path / "run"
    result = train(
        "--config",
        "tiny",
        "--mesh",
        "dp=2,tp=4",
        "--out",
        str(out),
        "train.steps=3",
        "model.n_layers=3",
    )
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stdout  # the count is printed at start
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in lines if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["step"] for r in lines if "val_loss" in r] == [1, 3]
    for key in (
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "tokens_per_s_per_device",
        "step_time_s",
    ):
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[0]["tokens_per_s"] == pytest.approx(8 * rows[0]["tokens_per_s_per_device"])
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["n_layers"] == 3 and saved["mesh"] == "dp=2,tp=4"


@pytest.mark.parametrize(
    "args, sentence",
    [
        (["--mesh", "dp=3"], "the mesh dp=3 has 3 devices but 8 are available"),
        (["--mesh", "dp=2,xp=4"], "unknown mesh axis 'xp'"),
        (
            ["--mesh", "tp=4,dp=2", "model.n_heads=6", "model.head_dim=8", "model.n_kv_heads=2"],
            "model.n_heads=6 is not divisible by tensor=4",
        ),
        (["--mesh", "tp=8"], "model.n_kv_heads=4 is not divisible by tensor=8"),
        (
            ["--mesh", "tp=8", "model.vocab_size=260", "model.n_kv_heads=8"],
            "model.vocab_size=260 is not divisible by tensor=8",
        ),
        (
            ["--mesh", "dp=8", "train.global_batch_size=20"],
            "train.global_batch_size=20 is not divisible by the data-parallel size 8",
        ),
        (
            ["--mesh", "pp=4,dp=2", "model.n_layers=6"],
            "model.n_layers=6 is not divisible by 4 pipeline stages x 1 repeats = 4",
        ),
        (
            ["model.d_modle=64"],
            "unknown config key 'model.d_modle' in the command line; did you mean 'model.d_model'?",
        ),
        (["--config", "gpt-125m"], "unknown config preset 'gpt-125m': did you mean 'gpt-124m'?"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_code_2(tmp_path, args, sentence):
    if "--config" not in args:
        args = ["--config", "tiny", *args]
    result = train(*args, "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and sentence in errors[0], result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before any training


def test_a_stop_with_a_checkpoint_creates_the_launchers_marker(tmp_path, monkeypatch):
    """srun --kill-on-bad-exit may report a killed peer's signal instead of 75: the marker file
    tells launch/slurm-run.sh that the run stopped with a checkpoint and should be requeued."""
    from jaxlm.cli import run_command
    from jaxlm.errors import EXIT_PREEMPTED, Preempted, UsageError

    marker = tmp_path / "stopped"
    monkeypatch.setenv("JAXLM_STOP_MARKER", str(marker))

    def usage():
        raise UsageError("a mistake")

    assert run_command(usage) == 2 and not marker.exists()

    def preempted():
        raise Preempted("stopped by SIGUSR1")

    assert run_command(preempted) == EXIT_PREEMPTED and marker.exists()


@pytest.mark.parametrize(
    "command, argv, sentence",
    [
        (
            "plan",
            ["--mesh", "dp=1", "--mfu", "-0.4"],
            "argument --mfu: must be in (0, 1], not -0.4",
        ),
        ("plan", ["--mesh", "dp=1", "--tokens=-1e9"], "argument --tokens: must be positive"),
        ("plan", ["--mesh", "dp=1", "--devices", "0"], "argument --devices: must be at least 1"),
        ("bench", ["--mesh", "dp=1", "--steps", "0"], "argument --steps: must be at least 1"),
        ("bench", ["--mesh", "dp=1", "--warmup", "-1"], "argument --warmup: must be at least 0"),
        ("tune", ["--max-trials", "0"], "argument --max-trials: must be at least 1, not 0"),
        ("train", ["--cpu-devices", "0"], "argument --cpu-devices: must be at least 1, not 0"),
        ("train", ["--cpu-devices", "two"], "argument --cpu-devices: must be int, not 'two'"),
        ("eval", ["--run", "r", "--batches", "0"], "argument --batches: must be at least 1"),
        (
            "generate",
            ["--run", "r", "--prompt", "a", "--max-new-tokens", "0"],
            "argument --max-new-tokens: must be at least 1, not 0",
        ),
    ],
)
def test_a_flag_outside_its_domain_exits_2_naming_it(command, argv, sentence, capsys):
    module = importlib.import_module(f"jaxlm.{command}")
    with pytest.raises(SystemExit) as exited:
        module.parse_args(argv)
    assert exited.value.code == 2
    assert sentence in capsys.readouterr().err


COMMANDS = ["train", "eval", "generate", "plan", "tune", "bench", "launch", "data", "convert"]


class _Parsed(Exception):
    """Raised in place of parsing: carries the parser a command built."""


def _parser_of(command, monkeypatch):
    from jaxlm import cli

    def capture(parser, *args, **kwargs):
        raise _Parsed(parser)

    monkeypatch.setattr(cli.Parser, "parse_known_args", capture)
    with pytest.raises(_Parsed) as parsed:
        module = f"jaxlm.{command}" + (".__main__" if command in ("data", "convert") else "")
        importlib.import_module(module).parse_args([])
    return parsed.value.args[0]


def _options(parser):
    """(parser, action) for every option and positional of `parser` and its subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _options(sub)
        elif not isinstance(action, argparse._HelpAction):
            yield parser, action


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help_and_shows_its_default(command, monkeypatch):
    from jaxlm import cli

    missing = []
    for parser, action in _options(_parser_of(command, monkeypatch)):
        name = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
        formatter = parser._get_formatter()
        formatter.add_argument(action)
        shown = " ".join(formatter.format_help().split())
        if not action.help:
            missing.append(f"{name}: no help")
        elif action.option_strings and not cli._no_default(action):
            if str(action.default) not in shown:
                missing.append(f"{name}: no default in '{shown}'")
    assert not missing, "\n".join(missing)


def test_print_config_prints_the_resolved_yaml_without_starting_jax(tmp_path):
    program = (
        "import sys\n"
        "from jaxlm import train\n"
        "code = train.main(['--config', 'tiny', '--print-config', 'train.steps=7', "
        f"'--out', {str(tmp_path / 'run')!r}])\n"
        "assert 'jax' not in sys.modules, 'JAX was imported'\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["steps"] == 7 and printed["model"]["d_model"] == 64
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "command, argv, sentence",
    [
        ("bench", ["--config", "tiny", "--mesh", "dp=1", "--out", "{blocked}/r.json"], None),
        ("bench", ["--config", "tiny", "--mesh", "dp=1", "--out", "{listless}"], "no results list"),
        (
            "data",
            ["tokenizer", "--input", "{text}", "--vocab-size", "64", "--out", "{blocked}/t.model"],
            None,
        ),
        (
            "data",
            ["prepare", "--input", "{text}", "--tokenizer", "t.model", "--out", "{blocked}/d"],
            None,
        ),
        (
            "data",
            ["prepare", "--input", "{text}", "--tokenizer", "t.model", "--out", "{text}"],
            "it is a file",
        ),
        ("eval", ["--run", "r", "--json", "{blocked}/e.json"], None),
        ("eval", ["--run", "r", "--tokens", "{text}", "--logits-out", "{blocked}/l.npy"], None),
        ("convert", ["from-hf", "hf", "--out", "{blocked}/run"], None),
        ("convert", ["to-hf", "r", "--out", "{text}"], "it is a file"),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    command, argv, sentence, tmp_path, capsys
):
    """Each command checks its outputs first: the work would otherwise be done, then lost."""
    blocked = tmp_path / "a-file"  # a path under a file cannot be created, even by root
    blocked.write_text("")
    (tmp_path / "listless.json").write_text("{}")
    (tmp_path / "text.txt").write_text("print('hello')\n")
    names = {
        "blocked": blocked,
        "listless": tmp_path / "listless.json",
        "text": tmp_path / "text.txt",
    }
    argv = [a.format(**names) for a in argv]
    before = sorted(tmp_path.rglob("*"))
    module = f"jaxlm.{command}" + (".__main__" if command in ("data", "convert") else "")
    assert importlib.import_module(module).main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write") or sentence in err, err
    assert sentence is None or sentence in err
    assert len(err.strip().splitlines()) == 1 and sorted(tmp_path.rglob("*")) == before
