import dataclasses
import math
import re
import typing

import pytest

from jaxlm import config as config_lib
from jaxlm import domain
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
        ("model.rope_scaling.factr=8", "did you mean 'model.rope_scaling.factor'"),
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
    "content, message",
    [
        (
            "train:\n  lr: 1.0e-3  # d\xe9faut\n".encode("latin-1"),
            r"is not UTF-8 text \(byte 24 is 0xe9\)",
        ),
        (b"train: [steps\n", "is not valid YAML"),
        (b"- 1\n- 2\n", "must hold a mapping of keys to values"),
    ],
)
def test_a_config_file_that_cannot_be_read_is_refused_in_one_sentence(tmp_path, content, message):
    path = tmp_path / "mine.yaml"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=message) as refusal:
        config_lib.load(str(path))
    assert "\n" not in str(refusal.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.n_kv_heads=3"], "model.n_kv_heads=3 must divide model.n_heads=8"),
        (["model.d_model=60"], "model.d_model=60 is not divisible by model.n_heads=8"),
        (
            ["model.positions=learned", "train.seq_len=512"],
            "longer than the model's context",
        ),
        (["model.head_dim=7"], "even head dimension"),
        (
            ["model.rope_scaling.rope_type=llama3", "model.rope_scaling.high_freq_factor=1"],
            "model.rope_scaling.high_freq_factor=1 must be larger than "
            "model.rope_scaling.low_freq_factor=1",
        ),
        (["train.steps=0"], "train.steps must be at least 1"),
    ],
)
def test_inconsistent_configs_are_refused(overrides, message):
    with pytest.raises(UsageError, match=message):
        config_lib.load("tiny", overrides)


def _fields(cls, prefix=""):
    """(dotted key, field, type) of every setting of a config dataclass, sections walked."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(hints[field.name]):
            yield from _fields(hints[field.name], f"{key}.")
        else:
            yield key, field, hints[field.name]


CONFIG_FIELDS = list(_fields(config_lib.Config))


def test_every_setting_declares_the_values_it_accepts():
    """A key added without a domain (and not a Literal or bool, whose type is its domain) fails
    here, so no key can skip validation."""
    undeclared = [
        key
        for key, field, annotation in [*CONFIG_FIELDS, *_fields(config_lib.Sampling, "--")]
        if domain.domain_of(field) is None and not domain.type_is_domain(annotation)
    ]
    assert undeclared == []


def _outside(field, annotation):
    """Values the field must refuse: outside its domain, or outside its type."""
    declared = domain.domain_of(field)
    if declared is not None:
        return declared.outside()
    return ["maybe"]  # a Literal's or a bool's


@pytest.mark.parametrize(
    "key, field, annotation", CONFIG_FIELDS, ids=[k for k, *_ in CONFIG_FIELDS]
)
def test_an_out_of_domain_value_of_every_setting_is_refused_naming_the_key(key, field, annotation):
    values = _outside(field, annotation)
    assert values, f"{key}: no value outside its domain to try"
    for value in values:
        text = "nan" if isinstance(value, float) and math.isnan(value) else str(value)
        with pytest.raises(UsageError) as refused:
            config_lib.load("tiny", [f"{key}={text}"])
        sentence = str(refused.value)
        assert key in sentence and "\n" not in sentence, sentence
        # the same value from a YAML preset is refused as well
        nested = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        with pytest.raises(UsageError, match=re.escape(key)):
            config_lib.validate(config_lib.merge(config_lib.Config(), nested, source="a test"))


@pytest.mark.parametrize(
    "override, sentence",
    [
        ("train.lr=-1e-3", "train.lr must be at least 0, not -0.001"),
        ("train.lr=nan", "train.lr must be at least 0, not nan"),
        ("train.beta2=1", "train.beta2 must be in [0, 1), not 1.0"),
        ("train.adam_eps=-1e-8", "train.adam_eps must be positive"),
        ("train.grad_clip=-1", "train.grad_clip must be at least 0"),
        ("model.n_kv_heads=0", "model.n_kv_heads must be none or at least 1, not 0"),
        ("model.head_dim=0", "model.head_dim must be none or at least 1, not 0"),
        ("train.micro_batch_size=0", "train.micro_batch_size must be none or at least 1"),
        ("checkpoint.keep=0", "checkpoint.keep must be at least 1, not 0"),
        ("model.rope_scaling.factor=0.5", "model.rope_scaling.factor must be at least 1, not 0.5"),
        ("log.every=0", "log.every must be at least 1, not 0"),
        ("train.seq_len=4096", "longer than the model's context (model.max_seq_len=256)"),
        (
            "train.time_limit=soon",
            "train.time_limit must be none or seconds or HH:MM:SS, not 'soon'",
        ),
    ],
)
def test_the_refusal_is_one_sentence_with_key_value_and_domain(override, sentence):
    with pytest.raises(UsageError, match=re.escape(sentence)):
        config_lib.load("tiny", [override])
