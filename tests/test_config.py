import pytest

from jaxlm import config as config_lib
from jaxlm.errors import UsageError


def test_defaults_then_preset_then_overrides():
    cfg = config_lib.load(
        "tiny",
        [
            "train.steps=7",
            "model.compute_dtype=float16",
            "train.lr=1e-3",
            "train.micro_batch_size=4",
            "model.n_kv_heads=none",
            "train.zero1=true",
        ],
    )
    assert cfg.model.d_model == 64  # from the preset
    assert cfg.model.norm == "rmsnorm"  # a default the preset keeps
    assert cfg.train.steps == 7 and cfg.train.lr == 1e-3 and cfg.train.zero1 is True
    assert cfg.model.compute_dtype == "float16" and cfg.train.micro_batch_size == 4
    assert cfg.model.n_kv_heads is None and cfg.model.kv_heads == cfg.model.n_heads


def test_every_preset_loads_and_round_trips():
    for path in sorted(config_lib.preset_dir("configs").glob("*.yaml")):
        cfg = config_lib.load(path.stem)
        assert config_lib.from_dict(config_lib.to_dict(cfg)) == cfg
        assert cfg.model.d_model % cfg.model.n_heads == 0


def test_yaml_file_as_preset(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  d_model: 96\nmesh: fsdp=-1\n")
    cfg = config_lib.load(str(path))
    assert cfg.model.d_model == 96 and cfg.mesh == "fsdp=-1"


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.d_modle=5", "did you mean 'model.d_model'"),
        ("trian.steps=5", "did you mean 'train.steps'"),
        ("train.steps=five", "train.steps must be int"),
        ("model.norm=batchnorm", "model.norm must be one of rmsnorm, layernorm"),
        ("train.steps", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(UsageError, match=message):
        config_lib.load(None, [override])


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(
        UsageError, match="unknown config preset 'gpt-125m': did you mean 'gpt-124m'"
    ):
        config_lib.load("gpt-125m")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.n_kv_heads=3"], "model.n_kv_heads=3 must divide model.n_heads=8"),
        (["model.d_model=60"], "model.d_model=60 is not divisible by model.n_heads=8"),
        (
            ["model.positions=learned", "train.seq_len=512"],
            "longer than the learned position table",
        ),
        (["model.head_dim=7"], "even head dimension"),
        (["train.steps=0"], "train.steps must be at least 1"),
    ],
)
def test_inconsistent_configs_are_refused(overrides, message):
    with pytest.raises(UsageError, match=message):
        config_lib.load("tiny", overrides)
