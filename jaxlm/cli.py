"""What every `python -m jaxlm.*` command shares at its edge: the common flags (the config, mesh
and overrides trio, `--cpu-devices`), log lines, and the exit-code rule.

Commands are thin: they parse, call a library module, and render. JAX reads its device count
and platform once, when its backends start, so the flags that set them are applied here, before
a command imports any module that runs JAX.
"""

import argparse
import logging
import os
import pathlib
import sys
from collections.abc import Callable, Sequence

from jaxlm import config as config_lib
from jaxlm import cost
from jaxlm.domain import Range, at_least
from jaxlm.errors import EXIT_FAILED, EXIT_PREEMPTED, EXIT_USAGE, Diverged, Preempted, UsageError

log = logging.getLogger("jaxlm")


CONSOLE = "jaxlm-console"  # the name of the handler that setup_logging adds


def setup_logging() -> None:
    """jaxlm's own lines on stdout, bare; JAX's and other libraries' loggers keep their levels."""
    if not any(h.get_name() == CONSOLE for h in log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.set_name(CONSOLE)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # a library that configures the root logger must not echo our lines


def log_to_stderr() -> None:
    """jaxlm's log lines on stderr, for the tools whose stdout is their product (text, results).
    Only its own handler moves: others (a test runner's capture) stay where they were."""
    for handler in log.handlers:
        if handler.get_name() == CONSOLE:
            handler.setStream(sys.stderr)


# --- flags ---------------------------------------------------------------------------------------


class DefaultsShown(argparse.HelpFormatter):
    """Ends each option's help with its default, unless the help already speaks of it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or _no_default(action) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def _no_default(action: argparse.Action) -> bool:
    """A flag whose absence means "not set" (None, a store_true's False); 0 is a default."""
    return any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS))


class Parser(argparse.ArgumentParser):
    """Every command's argument parser (subcommands' too): defaults shown in --help."""

    def __init__(self, *args, formatter_class=DefaultsShown, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def in_domain(kind: type, domain: Range) -> Callable[[str], float]:
    """An argparse `type=` that parses `kind` and refuses values outside `domain`: argparse then
    exits 2 with one sentence naming the flag, before any work."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {kind.__name__}, not '{text}'") from None
        if not domain.contains(value):
            raise argparse.ArgumentTypeError(f"must be {domain.describe()}, not {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


COUNT = in_domain(int, at_least(1))  # steps, devices, processes, tokens to generate


def add_config_args(
    p: argparse.ArgumentParser, *, mesh: bool = True, mesh_required: bool = False
) -> None:
    """--config, --mesh and the key=value overrides, as train, plan and bench take them."""
    p.add_argument("--config", help="preset name in configs/ (e.g. tiny, gpt-124m) or a YAML file")
    if mesh:
        p.add_argument(
            "--mesh",
            required=mesh_required,
            help="mesh spec such as dp=2,fsdp=2,tp=2 (one axis may be -1) or a preset name in "
            "meshes/" + ("" if mesh_required else "; default dp=-1 (all devices)"),
        )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides such as train.steps=100 model.n_layers=8",
    )


def load_config(args: argparse.Namespace, extra: Sequence[str] = ()) -> config_lib.Config:
    """The config the trio names: preset, then overrides, then --mesh, then `extra`."""
    mesh = getattr(args, "mesh", None)
    overrides = [*args.overrides, *([f"mesh={mesh}"] if mesh else []), *extra]
    return config_lib.load(args.config, overrides)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """--run, --step and --mesh, as eval and generate take them: a trained run, served anew."""
    p.add_argument(
        "--run",
        type=pathlib.Path,
        required=True,
        metavar="RUN_DIR",
        help="a run directory of python -m jaxlm.train (its config.yaml and checkpoints)",
    )
    p.add_argument(
        "--step",
        type=in_domain(int, at_least(0)),
        help="the checkpoint to use (default: the newest)",
    )
    p.add_argument(
        "--mesh",
        default="dp=-1",
        help="mesh spec or preset to load the parameters on, e.g. tp=2 (no pp)",
    )


def add_target_args(p: argparse.ArgumentParser) -> None:
    """The options plan and tune share: the machine the model is meant for."""
    p.add_argument(
        "--devices",
        type=COUNT,
        help="devices in all (default: the mesh's size); compiled on this many fake CPU devices",
    )
    p.add_argument(
        "--device-kind",
        default=cost.DEFAULT_DEVICE,
        help=f"the target device: a100, h100, h200, gh200, mi250x, mi300x, a64fx, "
        f"tpu v4, tpu v5p (default {cost.DEFAULT_DEVICE})",
    )
    p.add_argument(
        "--devices-per-node",
        type=COUNT,
        help="devices in one node (default: the device kind's usual node)",
    )


def add_cpu_devices(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cpu-devices",
        type=COUNT,
        help="on CPU, pretend to have this many devices (to try a mesh on a laptop)",
    )


def use_cpu_devices(n: int | None) -> None:
    """--cpu-devices: set before JAX starts (the same as JAX_NUM_CPU_DEVICES=N)."""
    if n is None:
        return
    if n < 1:
        raise UsageError(f"--cpu-devices must be at least 1, not {n}")
    os.environ["JAX_NUM_CPU_DEVICES"] = str(n)


def use_fake_cpu_devices(n: int) -> None:
    """Compile for `n` fake CPU devices, whatever accelerators there are (plan, tune); must run
    before JAX starts its backends."""
    import jax  # the backends start later, at the first device query

    if n < 1:
        raise UsageError(f"--devices must be at least 1, not {n}")
    try:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already up (a notebook, the tests): they must match
        if jax.device_count() != n:
            raise UsageError(
                f"JAX already runs with {jax.device_count()} devices, not {n}"
            ) from None


# --- outputs -------------------------------------------------------------------------------------


def check_writable(path: pathlib.Path | None, what: str, *, directory: bool = False) -> None:
    """Refuse, before any work, an output that could not be written when the work is done: a
    file where a directory is meant or the other way round, a parent that is a file, or no
    permission. Creates nothing (a refused command writes nothing)."""
    if path is None:
        return
    path = pathlib.Path(path)
    if path.exists() and path.is_dir() != directory:
        kind = "a directory" if path.is_dir() else "a file"
        raise UsageError(f"cannot write {what} {path}: it is {kind}")
    # files are written beside themselves and renamed into place: their directory must take
    # new entries, as must the nearest existing ancestor of anything still to be created
    target = path if path.exists() and directory else path.parent
    while not target.exists():
        target = target.parent
    if not target.is_dir():
        raise UsageError(f"cannot write {what} {path}: {target} is a file, not a directory")
    if not os.access(target, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {what} {path}: permission denied")


# --- running -------------------------------------------------------------------------------------


def run_command(body: Callable[[], object]) -> int:
    """Run a command's body; a UsageError becomes one line on stderr and exit code 2, a
    preemption exit code 75 and a diverged run exit code 1 (see jaxlm/errors.py)."""
    setup_logging()
    try:
        body()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Preempted as e:
        log.info("%s", e)
        _mark_stopped()
        return EXIT_PREEMPTED
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _mark_stopped() -> None:
    """Create the file JAXLM_STOP_MARKER names, if set: a launcher's way to learn that the run
    stopped with a complete checkpoint when the exit code is lost (under
    `srun --kill-on-bad-exit` the first task to exit 75 gets its peers killed, and srun then
    reports their signal, not 75)."""
    marker = os.environ.get("JAXLM_STOP_MARKER")
    if marker:
        try:
            pathlib.Path(marker).touch()
        except OSError as e:
            log.warning("could not create JAXLM_STOP_MARKER %s: %s", marker, e)
