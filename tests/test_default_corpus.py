"""`python -m jaxlm.train` with no data flags: the default corpus, built from an empty cache."""

import json
import math
import os
import subprocess
import sys


def test_default_model_learns_the_standard_library_from_an_empty_cache(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXLM_CACHE": str(tmp_path / "cache")}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    result = subprocess.run(
        [sys.executable, "-m", "jaxlm.train", "--out", str(tmp_path / "run"), "train.steps=300"],
        capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr
    assert "building the default corpus" in result.stdout
    assert list((tmp_path / "cache").glob("stdlib-py*-v4096/manifest.json"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert abs(val[0] - math.log(4096)) < 0.3  # starts near ln(vocab)
    assert val[-1] <= 0.6 * val[0], val  # and falls by at least 40 %
