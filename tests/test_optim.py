import jax
import pytest

from jaxlm import config as config_lib
from jaxlm import model as model_lib
from jaxlm import optim


def test_weight_decay_only_on_projection_matrices_and_untied_head():
    for style, head in (
        (["model.tie_embeddings=false"], True),
        (
            [
                "model.tie_embeddings=true",
                "model.use_bias=true",
                "model.norm=layernorm",
                "model.positions=learned",
            ],
            False,
        ),
    ):
        shapes = model_lib.describe(config_lib.load("tiny", style).model).shapes
        flat = {
            jax.tree_util.keystr(k): v
            for k, v in jax.tree_util.tree_leaves_with_path(optim.decay_mask(shapes))
        }
        decayed = {k for k, v in flat.items() if v}
        assert all("_proj" in k or "lm_head" in k for k in decayed)
        assert not any(w in k for k in decayed for w in ("norm", "bias", "embedding"))
        assert len([k for k in decayed if "_proj" in k]) == 7  # q, k, v, o, gate, up, down
        assert any("lm_head" in k for k in decayed) == head


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    t = config_lib.load(
        None, ["train.steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr_ratio=0.1"]
    ).train
    lr = optim.schedule(t)
    assert 0 < float(lr(0)) < float(lr(5)) < float(lr(10)) == pytest.approx(1.0)
    assert float(lr(100)) == pytest.approx(0.1)
    assert float(lr(55)) == pytest.approx(0.55, rel=1e-3)  # halfway down the cosine
