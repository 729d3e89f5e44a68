"""A Hugging Face directory (config.json + safetensors) -> a jaxlm run directory.

    RUN/config.yaml               the jaxlm config: model.* from config.json, the rest defaults
    RUN/tokenizer.model           the SentencePiece tokenizer, where HF_DIR has one (and its
    RUN/tokenizer_config.json     settings, e.g. whether a BOS token starts every text)
    RUN/checkpoints/0/            an Orbax checkpoint whose state is {"params": ...}

The checkpoint restores on any mesh through `jaxlm.checkpoint.load_params` (generation,
evaluation, `checkpoint.init_from=RUN` to fine-tune in a new run directory).

Memory: the safetensors files are opened lazily, every tensor is read on its own (a fused
one, GPT-2's c_attn, only in the part needed), and one stacked jaxlm parameter [L, ...] is
assembled on the host at a time, placed on the mesh's devices in its shards and dropped from
the host. The host thus holds about one stacked parameter (one layer's tensor times the
number of layers), never the model; the model lives on the devices, split by `--mesh` (default
fsdp over all of them), until Orbax writes it. On a CPU-only machine the devices' memory is the
host's. bfloat16 and float16 tensors are read through ml_dtypes and widened to float32, the
dtype of jaxlm's parameters.
"""

import dataclasses
import json
import logging
import pathlib
import shutil

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, so safetensors can read it)
import numpy as np
from safetensors import safe_open

from jaxlm import checkpoint, runs, sharding
from jaxlm import config as config_lib
from jaxlm import mesh as mesh_lib
from jaxlm import model as model_lib
from jaxlm.convert import layouts
from jaxlm.errors import UsageError

log = logging.getLogger("jaxlm")

_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class SafetensorsDir:
    """The tensors of a directory's .safetensors files, by name, read lazily one at a time."""

    def __init__(self, directory: pathlib.Path):
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            found = "PyTorch .bin files" if list(directory.glob("*.bin")) else "no weights"
            raise UsageError(
                f"{directory} holds {found}: jaxlm reads .safetensors files "
                f"(save the model with save_pretrained(..., safe_serialization=True))"
            )
        self._handles = {}
        self._file_of: dict[str, pathlib.Path] = {}
        for path in files:
            handle = safe_open(str(path), framework="np")
            self._handles[path] = handle
            for name in handle.keys():
                self._file_of[name] = path

    def names(self) -> set[str]:
        return set(self._file_of)

    def slice(self, name: str):
        return self._handles[self._file_of[name]].get_slice(name)


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where one jaxlm parameter comes from: a Hugging Face tensor, and its part of the joined
    (out) axis."""

    tensor: layouts.Tensor
    start: int
    stop: int


def convert(hf_dir, out, mesh_spec: str = "fsdp=-1") -> pathlib.Path:
    """Convert the model in `hf_dir` into the run directory `out`; return the checkpoint's path."""
    hf_dir, out = pathlib.Path(hf_dir), pathlib.Path(out)
    arch, cfg = layouts.run_config(_read_config(hf_dir), hf_dir)
    files = SafetensorsDir(hf_dir)
    spec = model_lib.describe(cfg.model)
    shapes = {path: tuple(x.shape) for path, x in layouts.flat(spec.shapes).items()}
    table = layouts.tensors(arch, cfg.model)
    sources, names = _plan(table, shapes, cfg.model.n_layers, files, hf_dir)
    tokenizer = hf_dir / "tokenizer.model"
    data = {"source": "synthetic"}  # a converted model has no corpus; evaluate with --data
    if tokenizer.is_file():
        data["tokenizer"] = str(out.absolute() / "tokenizer.model")
    cfg = config_lib.merge(cfg, {"data": data}, source="the converter")
    layouts.check_new_directory(out)
    mesh = mesh_lib.make_mesh(mesh_spec)
    runs.check_mesh(cfg, mesh)

    # Compute starts here: every check a user's input can fail is behind us.
    shardings = layouts.flat(sharding.tree_shardings(mesh, spec.axes))
    params = {}
    for path, shape in shapes.items():
        host = _assemble(files, sources[path], names, shape)
        params[path] = jax.device_put(host, shardings[path])
        del host  # the device copy (in shards) is all that is kept
    params = layouts.nested(params)

    tokenizer_files = [
        f
        for f in (tokenizer, hf_dir / "tokenizer_config.json")
        if tokenizer.is_file() and f.is_file()
    ]
    path = write_run(
        out,
        cfg,
        params,
        mesh,
        tokenizer_files,
        converted_from=str(hf_dir.absolute()),
        architecture=arch,
    )
    log.info(
        "converted the %s in %s (%s parameters, %d tensors) into %s",
        arch,
        hf_dir,
        f"{model_lib.param_count(spec.shapes):,}",
        len(names),
        path,
    )
    if not tokenizer.is_file():
        log.info("%s has no SentencePiece tokenizer.model: generation needs --tokenizer", hf_dir)
    return path


def write_run(
    out: pathlib.Path, cfg: config_lib.Config, params, mesh, tokenizer_files=(), **metadata
) -> pathlib.Path:
    """Save `params` (arrays of the model `cfg` describes) as the step-0 checkpoint of a new run
    directory, with its config.yaml and tokenizer files; return the checkpoint's path."""
    out = pathlib.Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_lib.dump(cfg))
        for f in tokenizer_files:
            shutil.copyfile(f, out / pathlib.Path(f).name)
    except OSError as e:
        raise UsageError(f"cannot write to {out}: {e.strerror}") from None
    metadata = {
        "param_shapes": checkpoint.param_shapes(params),
        "seed": None,
        "data": None,
        "mesh": mesh_lib.describe(dict(mesh.shape)),
        "devices": mesh.devices.size,
        "params_only": True,
        **metadata,
    }
    checkpoints = checkpoint.Checkpoints(out, config_lib.CheckpointConfig(async_save=False))
    checkpoints.save(0, {"params": params}, {}, cfg, metadata, wait=True)
    checkpoints.close()
    return checkpoints.directory / "0"


def _read_config(hf_dir: pathlib.Path) -> dict:
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise UsageError(f"{hf_dir} is not a directory")
    if not path.is_file():
        raise UsageError(f"{hf_dir} has no config.json: it is not a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UsageError(f"{path} is not valid JSON") from None


def _plan(table, shapes, n_layers, files: SafetensorsDir, hf_dir):
    """Where each jaxlm parameter comes from, and the file name of every Hugging Face tensor;
    every tensor must be there, with the shape the config implies, and nothing else."""
    available = files.names()
    sources: dict[str, _Source] = {}
    names: dict[str, str] = {}  # the name jaxlm expects -> the name in the files
    missing, wrong = [], []
    for tensor in table:
        slices = [layouts.slice_shape(shapes[p], tensor.per_layer) for p in tensor.params]
        start = 0
        for path, shape in zip(tensor.params, slices, strict=True):
            width = layouts.piece_width(shape, tensor.split)
            sources[path] = _Source(tensor, start, start + width)
            start += width
        expected = layouts.hf_shape(tensor, slices)
        for i in range(n_layers) if tensor.per_layer else [None]:
            name = tensor.name.format(i=i)
            found = _find(name, available)
            if found is None:
                missing.append(name)
                continue
            names[name] = found
            got = files.slice(found)
            if tuple(got.get_shape()) != expected or got.get_dtype() not in _FLOAT_DTYPES:
                wrong.append(
                    f"{found} {got.get_dtype()}{list(got.get_shape())} "
                    f"(expected floats of shape {list(expected)})"
                )
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UsageError(
            f"{hf_dir} lacks tensors the config implies: {', '.join(missing[:5])}{more}"
        )
    if wrong:
        raise UsageError(
            f"{hf_dir} has tensors of other shapes than its config implies: {'; '.join(wrong[:3])}"
        )
    tied_head = {"lm_head.weight"} if "lm_head" not in shapes else set()  # a copy of the table
    extra = sorted(
        n
        for n in available - set(names.values()) - tied_head
        if not n.endswith(layouts.IGNORED_SUFFIXES)
    )
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise UsageError(
            f"{hf_dir} has tensors jaxlm's model has no place for: {', '.join(extra[:5])}{more}"
        )
    for tensor in table:
        if tensor.zeros:  # e.g. Llama's gate bias, which jaxlm's SwiGLU does not have
            for name in [tensor.name.format(i=i) for i in range(n_layers)]:
                if np.any(files.slice(names[name])[:]):
                    raise UsageError(
                        f"{hf_dir}: {names[name]} is not zero, and jaxlm's model has no such bias"
                    )
    return sources, names


def _find(name: str, available: set[str]) -> str | None:
    """The tensor's name in the files: older GPT-2 checkpoints name theirs without the
    'transformer.' prefix."""
    if name in available:
        return name
    bare = name.removeprefix("transformer.")
    return bare if bare in available else None


def _assemble(files: SafetensorsDir, source: _Source, names: dict, shape) -> np.ndarray:
    """One jaxlm parameter, float32 on the host, read one layer's tensor at a time."""
    tensor = source.tensor
    out = np.empty(shape, np.float32)
    for i in range(shape[0]) if tensor.per_layer else [None]:
        part = files.slice(names[tensor.name.format(i=i)])
        a, b = source.start, source.stop
        if tensor.split is None:
            piece = part[a:b]
        elif tensor.transpose:  # [out, in]
            piece = part[a:b, :].T
        else:  # [in, out]
            piece = part[:, a:b]
        target = out if i is None else out[i]
        target[...] = piece.reshape(target.shape).astype(np.float32)
    return out
