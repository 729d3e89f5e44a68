"""Every test runs on 8 fake CPU devices, so every layout of the mesh can be tried here."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The default corpus cache of the tests is their own (subprocesses inherit it): never ~/.cache.
os.environ["JAXLM_CACHE"] = tempfile.mkdtemp(prefix="jaxlm-test-cache-")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from jaxlm import config as config_lib  # noqa: E402


@pytest.fixture
def tiny_cfg():
    """The tiny preset in float32 on synthetic data, so layouts can be compared to 1e-5."""

    def make(*overrides: str) -> config_lib.Config:
        return config_lib.load(
            "tiny", ["model.compute_dtype=float32", "data.source=synthetic", *overrides]
        )

    return make


def train_rows(rows: list[dict]) -> list[dict]:
    """The per-step rows of a run (validation rows left out)."""
    return [row for row in rows if "loss" in row]
