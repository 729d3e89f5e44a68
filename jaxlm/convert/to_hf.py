"""A jaxlm run directory -> a Hugging Face directory that `from_pretrained` loads.

    HF/config.json                   LlamaForCausalLM or GPT2LMHeadModel, by the model's shape
    HF/model.safetensors             the weights (model-0000k-of-0000n.safetensors and
                                     model.safetensors.index.json when they exceed one shard)
    HF/generation_config.json        BOS and EOS ids              (with a tokenizer)
    HF/tokenizer.model               the run's SentencePiece model (with a tokenizer)
    HF/tokenizer_config.json         LlamaTokenizer settings that encode as SentencePiece does,
                                     and the chat template of a run trained on conversations

Memory: the parameters are restored onto the mesh's devices (split by `--mesh`, default fsdp
over all of them); then one stacked parameter at a time (three for GPT-2's fused q, k, v) is
copied to the host, cut into its Hugging Face tensors, and written with the safetensors NumPy
API in shards of at most `shard_bytes`. The host holds about one stacked parameter and one
shard, never the model. (On a CPU-only machine the devices' memory is the host's.)

Tokenizer: jaxlm's SentencePiece models add a dummy prefix, split digits and fall back to bytes;
transformers' LlamaTokenizer (legacy=false) reproduces their ids on text that does not start
with a space. No BOS is added: jaxlm's documents start without one. A run converted from
Hugging Face keeps the tokenizer_config.json it came with.
"""

import json
import logging
import pathlib
import shutil

import jax
import ml_dtypes
import numpy as np
import sentencepiece as spm
from safetensors.numpy import save_file

from jaxlm import mesh as mesh_lib
from jaxlm import runs
from jaxlm.convert import layouts
from jaxlm.errors import UsageError

log = logging.getLogger("jaxlm")

SHARD_BYTES = 2 << 30  # Hugging Face's tools handle any size; 2 GiB bounds the host's share
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def convert(
    run_dir,
    out,
    *,
    step: int | None = None,
    mesh_spec: str = "fsdp=-1",
    dtype: str = "float32",
    shard_bytes: int = SHARD_BYTES,
) -> pathlib.Path:
    """Export the run's newest checkpoint (or that of `step`) to the directory `out`."""
    run = runs.open_run(run_dir, step)
    cfg = run.cfg.model
    arch = layouts.architecture_for(cfg)
    tokenizer = runs.tokenizer_path(run)
    out = pathlib.Path(out)
    layouts.check_new_directory(out)
    mesh = mesh_lib.make_mesh(mesh_spec)
    runs.check_mesh(run.cfg, mesh)

    # Compute starts here.
    params = layouts.flat(runs.load_params(run, mesh))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot write to {out}: {e.strerror}") from None
    writer = _ShardWriter(out, shard_bytes)
    for tensor in layouts.tensors(arch, cfg):
        # One stacked parameter per source on the host; `pop` frees its device copy too.
        sources = [np.asarray(jax.device_get(params.pop(p))) for p in tensor.params]
        for i in range(cfg.n_layers) if tensor.per_layer else [None]:
            slices = [s if i is None else s[i] for s in sources]
            writer.add(tensor.name.format(i=i), _hf_tensor(tensor, slices).astype(DTYPES[dtype]))
        del sources
    files = writer.finish()

    bos = eos = None
    if tokenizer is not None:
        bos, eos = _write_tokenizer(tokenizer, run, out, cfg.max_seq_len)
        (out / "generation_config.json").write_text(
            json.dumps(
                {"bos_token_id": bos, "eos_token_id": eos, "_from_model_config": True}, indent=2
            )
        )
    config = layouts.hf_config(cfg, arch, dtype=dtype, bos=bos, eos=eos)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    log.info(
        "exported step %d of %s as %s to %s (%d file%s)",
        run.step,
        run.directory,
        arch,
        out,
        len(files),
        "s" if len(files) > 1 else "",
    )
    if tokenizer is None:
        log.info(
            "no tokenizer written: the run has no SentencePiece model (synthetic data?), "
            "so transformers loads the weights and config only"
        )
    return out


def _hf_tensor(tensor: layouts.Tensor, slices: list[np.ndarray]) -> np.ndarray:
    """One Hugging Face tensor from its jaxlm parameters' slices (see layouts.Tensor)."""
    if tensor.zeros:
        return np.zeros(tensor.zeros, np.float32)
    if tensor.split is None:
        return np.concatenate([s.reshape(-1) for s in slices])
    joined = np.concatenate(
        [s.reshape(int(np.prod(s.shape[: tensor.split])), -1) for s in slices], axis=1
    )
    return np.ascontiguousarray(joined.T if tensor.transpose else joined)


class _ShardWriter:
    """Collects tensors and writes a safetensors file whenever the next would pass the limit."""

    def __init__(self, out: pathlib.Path, limit: int):
        self.out, self.limit = out, limit
        self.pending: dict[str, np.ndarray] = {}
        self.files: list[tuple[pathlib.Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, array: np.ndarray) -> None:
        pending = sum(a.nbytes for a in self.pending.values())
        if self.pending and pending + array.nbytes > self.limit:
            self._flush()
        self.pending[name] = array
        self.total += array.nbytes

    def _flush(self) -> None:
        path = self.out / f"model-part-{len(self.files) + 1:05d}.safetensors"
        # "format": "pt" is what transformers checks before loading a safetensors file
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending = {}

    def finish(self) -> list[pathlib.Path]:
        """Name the shards as transformers expects; an index when there are several."""
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
        )
        weight_map = {}
        for (path, tensors), name in zip(self.files, names, strict=True):
            path.rename(self.out / name)
            weight_map.update(dict.fromkeys(tensors, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return [self.out / name for name in names]


def _write_tokenizer(
    model: pathlib.Path, run: runs.Run, out: pathlib.Path, context: int
) -> tuple[int | None, int | None]:
    """Copy the SentencePiece model and describe it for transformers; (bos, eos) ids."""
    sp = spm.SentencePieceProcessor(model_file=str(model))
    shutil.copyfile(model, out / "tokenizer.model")
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    kept = run.directory / "tokenizer_config.json"  # a model converted from Hugging Face
    if kept.is_file():
        settings = json.loads(kept.read_text())
    else:
        settings = {
            "tokenizer_class": "LlamaTokenizer",
            # Metaspace prepending "▁" once, as SentencePiece's dummy prefix
            "legacy": False,
            "add_prefix_space": True,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # code: decode must give the text back
            "bos_token": piece(sp.bos_id()),
            "eos_token": piece(sp.eos_id()),
            "unk_token": piece(sp.unk_id()),
            "pad_token": piece(sp.pad_id()),
            "model_max_length": context,
        }
    template = run.directory / "chat_template.jinja"  # a run fine-tuned on conversations
    if template.is_file():
        settings["chat_template"] = template.read_text()
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    ids = (sp.bos_id(), sp.eos_id())
    return tuple(i if i >= 0 else None for i in ids)
