"""Where the state lives: read from the shards of real arrays on 8 devices."""

import jax
import pytest

from jaxlm import mesh as mesh_lib
from jaxlm import sharding
from jaxlm.errors import UsageError
from jaxlm.step import build_program


def init(cfg, spec):
    program = build_program(cfg, mesh_lib.make_mesh(spec))
    return program.init(jax.random.key(0))


def bytes_on(tree, device) -> int:
    return sum(
        s.data.nbytes
        for x in jax.tree.leaves(tree)
        for s in x.addressable_shards
        if s.device == device
    )


def total_bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("preset", ["tiny", "gpt-124m"])
def test_fsdp_puts_an_eighth_of_params_and_optimizer_state_on_each_device(tiny_cfg, preset):
    from jaxlm import config as config_lib

    cfg = tiny_cfg() if preset == "tiny" else config_lib.load(preset, ["model.n_layers=2"])
    state = init(cfg, "fsdp=8")
    for part in (state.params, state.opt_state):
        for device in jax.devices():
            assert bytes_on(part, device) == pytest.approx(total_bytes(part) / 8, rel=0.05)


def test_data_parallel_replicates_everything(tiny_cfg):
    state = init(tiny_cfg(), "dp=8")
    assert bytes_on(state.params, jax.devices()[3]) == total_bytes(state.params)


def test_zero1_shards_only_the_optimizer_state(tiny_cfg):
    state = init(tiny_cfg("train.zero1=true"), "dp=8")
    device = jax.devices()[5]
    assert bytes_on(state.params, device) == total_bytes(state.params)
    assert bytes_on(state.opt_state, device) == pytest.approx(
        total_bytes(state.opt_state) / 8, rel=0.05
    )


def test_tensor_parallel_is_megatron_layout(tiny_cfg):
    state = init(tiny_cfg(), "tp=4,dp=2")
    layers = state.params["layers"]
    spec = lambda x: tuple(x.sharding.spec)  # noqa: E731
    # ("fsdp" and "pipeline" have size 1 on this mesh: those dimensions are whole everywhere)
    assert spec(layers["attn"]["q_proj"]) == ("pipeline", "fsdp", "tensor", None)  # column-par.
    assert spec(layers["attn"]["o_proj"]) == ("pipeline", "tensor", None, "fsdp")  # row-parallel
    assert spec(layers["mlp"]["up_proj"]) == ("pipeline", "fsdp", "tensor")
    assert spec(layers["mlp"]["down_proj"]) == ("pipeline", "tensor", "fsdp")
    assert spec(state.params["embedding"]) == ("tensor", "fsdp")  # vocab-parallel
    q_shard = layers["attn"]["q_proj"].addressable_shards[0].data
    assert q_shard.shape[2] == layers["attn"]["q_proj"].shape[2] // 4


def test_logical_names_map_through_the_table():
    assert sharding.spec(("batch", "length", "act_embed")) == jax.P(
        ("data", "fsdp"), "context", None
    )
    assert sharding.spec(("batch", "kv_length", "kv_heads")) == jax.P(
        ("data", "fsdp"), None, "tensor"
    )
    assert sharding.spec(("embed", "mlp")) == jax.P("fsdp", "tensor")


@pytest.mark.parametrize(
    "spec, overrides, message",
    [
        ("tp=8", [], "model.n_kv_heads=4 is not divisible by tensor=8"),
        (
            "tp=4,dp=2",
            ["model.n_heads=6", "model.head_dim=8", "model.n_kv_heads=2"],
            "model.n_heads=6 is not divisible by tensor=4",
        ),
        (
            "tp=4,dp=2",
            ["model.vocab_size=250"],
            "model.vocab_size=250 is not divisible by tensor=4",
        ),
        (
            "fsdp=8",
            ["model.d_model=60", "model.head_dim=8"],
            "model.d_model=60 is not divisible by fsdp=8",
        ),
        (
            "dp=8",
            ["train.global_batch_size=12"],
            "global_batch_size=12 is not divisible by the data-parallel size 8",
        ),
        (
            "dp=8",
            ["train.micro_batch_size=3"],
            "micro_batch_size=3 does not divide the 2 sequences",
        ),
    ],
)
def test_layouts_that_do_not_fit_are_refused(tiny_cfg, spec, overrides, message):
    devices = jax.devices()[:1] if spec == "dp=1" else None
    with pytest.raises(UsageError, match=message):
        build_program(tiny_cfg(*overrides), mesh_lib.make_mesh(spec, devices))
