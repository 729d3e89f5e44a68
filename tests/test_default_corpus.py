"""`python -m jaxlm.train` with no data flags: the default corpus, built from an empty cache; the
trained model exports to Hugging Face with the same next-token logits in transformers."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import production_env

# The default model's 300 steps are compute, not compile: they run with XLA's defaults.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default model trained for 300 steps on the default corpus, from an empty cache."""
    tmp_path = tmp_path_factory.mktemp("default")
    env = production_env(JAX_PLATFORMS="cpu", JAXLM_CACHE=str(tmp_path / "cache"))
    env.pop("JAX_NUM_CPU_DEVICES", None)
    result = subprocess.run(
        # validation after step 1 and at the end, the two points the test compares
        [
            sys.executable,
            "-m",
            "jaxlm.train",
            "--out",
            str(tmp_path / "run"),
            "train.steps=300",
            "train.eval_every=300",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    return tmp_path, env, result


def test_default_model_learns_the_standard_library_from_an_empty_cache(default_run):
    tmp_path, _, result = default_run
    assert result.returncode == 0, result.stderr
    assert "building the default corpus" in result.stdout
    assert list((tmp_path / "cache").glob("stdlib-py*-v4096/manifest.json"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert abs(val[0] - math.log(4096)) < 0.3  # starts near ln(vocab)
    assert val[-1] <= 0.6 * val[0], val  # and falls by at least 40 %


@pytest.mark.hf
def test_the_trained_model_gives_the_same_next_token_logits_in_transformers(default_run):
    """Export with `python -m jaxlm.convert to-hf`, load with transformers' from_pretrained,
    and compare with `python -m jaxlm.eval --tokens --logits-out` on real code."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import sysconfig

    import sentencepiece as spm

    tmp_path, env, trained = default_run
    assert trained.returncode == 0, trained.stderr
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxlm.convert",
            "to-hf",
            str(tmp_path / "run"),
            "--out",
            str(tmp_path / "hf"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(  # the textbook attention
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(model).__name__ == "LlamaForCausalLM"

    text = os.path.join(sysconfig.get_paths()["stdlib"], "json", "decoder.py")
    with open(text) as f:
        text = f.read()[:1500]
    ids = tokenizer.encode(text)
    sp = spm.SentencePieceProcessor(
        model_file=str(next((tmp_path / "cache").glob("stdlib-py*-v4096/tokenizer.model")))
    )
    assert ids == sp.encode(text)  # the exported tokenizer is the run's

    tokens = np.asarray([ids])
    np.save(tmp_path / "ids.npy", tokens)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxlm.eval",
            "--run",
            str(tmp_path / "run"),
            "--tokens",
            str(tmp_path / "ids.npy"),
            "--logits-out",
            str(tmp_path / "logits.npy"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    jaxlm_logits = np.load(tmp_path / "logits.npy")
    with torch.no_grad():
        hf_logits = model(torch.tensor(tokens)).logits.numpy()
    difference = np.abs(jaxlm_logits - hf_logits)
    print(
        f"\ntrained default model, {tokens.shape[1]} tokens: max |logit diff| "
        f"{difference.max():.2e}, at the last position {difference[0, -1].max():.2e}"
    )
    assert difference[0, -1].max() <= 1e-4  # the next token's logits
    assert difference.max() <= 1e-4  # and every position's
    assert (jaxlm_logits.argmax(-1) == hf_logits.argmax(-1)).all()
