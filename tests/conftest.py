"""Every test runs on 8 fake CPU devices, so every layout of the mesh can be tried here."""

import os
import pathlib
import tempfile


def _session_dir(name: str) -> str:
    """A directory for this test run, shared by pytest-xdist's workers (and subprocesses)."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # the same in every worker of one run
    if run is None:
        return tempfile.mkdtemp(prefix=f"jaxlm-test-{name}-")
    path = pathlib.Path(tempfile.gettempdir()) / f"jaxlm-test-{name}-{run}"
    path.mkdir(exist_ok=True)
    return str(path)


os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The default corpus cache of the tests is their own (subprocesses inherit it): never ~/.cache.
os.environ["JAXLM_CACHE"] = _session_dir("cache")
# One XLA compilation cache for the session, subprocesses included: most tests compile the same
# few tiny programs, and on two cores compiling, not computing, is what takes their time. A hit
# returns the executable XLA compiled for the identical program, so no result changes.
os.environ["JAX_COMPILATION_CACHE_DIR"] = _session_dir("xla-cache")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
# The tests' programs are tiny: compiling them, not running them, takes their time, and LLVM's
# optimisation level 0 halves XLA's CPU compile time (a train step of the tiny preset: 6.8 s ->
# 3.5 s, its init 7.4 s -> 1.9 s). Runs that measure speed or train for real (the benchmarks, the
# default-corpus run) use XLA's defaults: see FAST_COMPILE and production_env().
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from jaxlm import config as config_lib  # noqa: E402


def tiny_config(*overrides: str) -> config_lib.Config:
    """The tiny preset in float32 on synthetic data, so layouts can be compared to 1e-5."""
    return config_lib.load(
        "tiny", ["model.compute_dtype=float32", "data.source=synthetic", *overrides]
    )


@pytest.fixture
def tiny_cfg():
    """`tiny_config`, for tests to take as a fixture (module fixtures import it)."""
    return tiny_config


def production_env(**changes: str) -> dict[str, str]:
    """The environment for a subprocess that trains as a user's run would: XLA's own defaults."""
    env = {**os.environ, **changes}
    env["XLA_FLAGS"] = env["XLA_FLAGS"].replace(FAST_COMPILE, "").strip()
    return env


def train_processes(n: int, args, *, devices_each: int = 4) -> list:
    """`python -m jaxlm.train ARGS` in `n` processes that find each other as jaxlm.launch's do
    (a coordinator on a free local port), started directly so that a test can signal each one
    and read each one's exit code. stderr is piped, as text."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices_each)}
    return [
        subprocess.Popen(
            [sys.executable, "-m", "jaxlm.train", *args],
            env={
                **env,
                "JAXLM_COORDINATOR": f"127.0.0.1:{port}",
                "JAXLM_NUM_PROCESSES": str(n),
                "JAXLM_PROCESS_ID": str(i),
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]


def packed_batch(rows: int, length: int, vocab: int) -> dict:
    """Token rows of two documents each (split at a different place in every row), with
    per-document positions and segment ids, as the data pipeline packs them."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (rows, length + 1))
    cut = 1 + np.arange(rows)[:, None] * 3 % (length - 2)
    column = np.arange(length)[None, :]
    second = column >= cut
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "weights": np.ones((rows, length), np.float32),
        "positions": np.where(second, column - cut, column).astype(np.int32),
        "segments": (1 + second).astype(np.int32),
    }


def packed_loss_and_gradients(cfg, mesh, rows: int):
    """The mean token loss of `packed_batch(rows, ...)` and its gradients, from `cfg`'s initial
    state on `mesh`, taken as the train step takes them (autodiff, or the 1F1B schedule)."""
    from jaxlm import sharding
    from jaxlm.step import build_program, make_add_gradients, make_loss_fn

    program = build_program(cfg, mesh)
    params = program.init(jax.random.key(0)).params
    batch = packed_batch(rows, cfg.train.seq_len, cfg.model.vocab_size)
    placed = jax.device_put(batch, program.batch_sharding)
    graphdef = program.spec.graphdef
    add_gradients = make_add_gradients(
        cfg, graphdef, program.stages, sharding.ActivationSharding(mesh), make_loss_fn(graphdef)
    )
    seed = np.float32(1 / batch["weights"].sum())

    @jax.jit
    def mean_loss_and_gradients(params, batch):
        zeros = jax.tree.map(jnp.zeros_like, params)
        ce_sum, grads = add_gradients(params, batch, seed, zeros)
        return ce_sum * seed, grads

    return mean_loss_and_gradients(params, placed)


def assert_same_loss_and_gradients(got, want) -> None:
    """(loss, gradients) pairs equal in float32: the loss to 1e-5, every gradient leaf too."""
    (got_loss, got_grads), (want_loss, want_grads) = got, want
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for (path, w), g in zip(
        jax.tree_util.tree_leaves_with_path(want_grads), jax.tree.leaves(got_grads), strict=True
    ):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7, err_msg=str(path))


def train_rows(rows: list[dict]) -> list[dict]:
    """The per-step rows of a run (validation rows left out)."""
    return [row for row in rows if "loss" in row]


def pytest_collection_modifyitems(items):
    """The default model's 300 steps are the longest single job of the suite: collected first,
    they start at once on one worker (pytest -n) while the other tests run beside them."""
    items.sort(key=lambda item: item.nodeid.split("::")[0] != "tests/test_default_corpus.py")
