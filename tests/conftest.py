"""Every test runs on 8 fake CPU devices, so every layout of the mesh can be tried here."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from jaxlm import config as config_lib  # noqa: E402


@pytest.fixture
def tiny_cfg():
    """The tiny preset in float32, so layouts can be compared to 1e-5."""

    def make(*overrides: str) -> config_lib.Config:
        return config_lib.load("tiny", ["model.compute_dtype=float32", *overrides])

    return make
