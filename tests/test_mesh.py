import jax
import pytest

from jaxlm import mesh as mesh_lib
from jaxlm.errors import UsageError


def test_parse_fills_missing_axes_and_minus_one():
    sizes = mesh_lib.resolve(mesh_lib.parse("dp=2,tp=-1"), 8)
    assert sizes == {"pipeline": 1, "data": 2, "fsdp": 1, "context": 1, "tensor": 4}
    assert mesh_lib.describe(sizes) == "dp=2,tp=4"


def test_tensor_is_innermost_then_context_then_fsdp_then_data():
    mesh = mesh_lib.make_mesh("dp=2,fsdp=2,tp=2")
    assert mesh.axis_names == ("pipeline", "data", "fsdp", "context", "tensor")
    ids = [[[d.id for d in row[0]] for row in block] for block in mesh.devices[0]]
    assert ids == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]  # neighbours share a tensor group
    mesh = mesh_lib.make_mesh("cp=2,tp=2,fsdp=2")
    assert [d.id for d in mesh.devices[0, 0, 1, 1]] == [6, 7]  # a context ring of tensor groups
    assert mesh_lib.describe(dict(mesh.shape)) == "fsdp=2,cp=2,tp=2"


def test_preset_by_name():
    mesh = mesh_lib.make_mesh("cpu-8")
    assert dict(mesh.shape) == {"pipeline": 1, "data": 2, "fsdp": 2, "context": 1, "tensor": 2}


def test_mesh_over_a_subset_of_devices():
    mesh = mesh_lib.make_mesh("tp=2", devices=jax.devices()[:2])
    assert mesh.devices.size == 2


@pytest.mark.parametrize(
    "spec, message",
    [
        ("dp=3", "has 3 devices but 8 are available"),
        ("dp=-1,tp=3", "the fixed axes multiply to 3, which does not divide 8"),
        ("xp=2", "unknown mesh axis 'xp'"),
        ("dp=-1,tp=-1", "only one mesh axis may be -1"),
        ("dp=two", "needs an integer size"),
        ("dp=2,data=4", "given twice"),
        ("no-such-mesh", "unknown mesh preset 'no-such-mesh'"),
    ],
)
def test_bad_meshes(spec, message):
    with pytest.raises(UsageError, match=message):
        mesh_lib.make_mesh(spec)
