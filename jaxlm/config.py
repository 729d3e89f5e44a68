"""Typed run configuration: dataclasses, YAML presets that only override, dotted overrides.

A run's configuration is built in three layers, each overriding the one before:

    the defaults below  <-  a preset (configs/NAME.yaml or any YAML file)  <-  key=value overrides

The defaults describe the small model that `python -m jaxlm.train` trains with no arguments.
Every key is typed; a value that does not parse, a choice that does not exist or a key that
does not exist (with the closest valid key named) raises `UsageError`. No JAX here: the
configuration is plain data that can be read, diffed and saved next to a run.
"""

import dataclasses
import difflib
import pathlib
import types
import typing
from typing import Any, Literal

import yaml

from jaxlm.errors import UsageError

DType = Literal["float32", "bfloat16", "float16"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the decoder-only transformer (see jaxlm/model).

    The defaults are the small model that `python -m jaxlm.train` trains on the default corpus:
    2.1 M parameters whose validation loss falls from ln(4096) = 8.3 to about 4.8 in 300 steps,
    under three minutes on two CPU cores.
    """

    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: as many as n_heads (plain multi-head attention)
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 512
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    positions: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    max_seq_len: int = 2048  # size of the learned position table; the longest usable context
    tie_embeddings: bool = False
    use_bias: bool = False
    init_std: float = 0.02
    compute_dtype: DType = "bfloat16"  # parameters stay float32; matmuls run in this dtype
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    remat: Literal["none", "full", "save_dots"] = "none"

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, batch geometry and the layout choices that are not the mesh itself."""

    steps: int = 300
    seed: int = 0
    global_batch_size: int = 32  # sequences per optimizer step, over all devices
    micro_batch_size: int | None = None  # sequences per data-parallel replica per forward pass;
    # None: global_batch_size / data-parallel size, i.e. no gradient accumulation
    seq_len: int = 128
    zero1: bool = False  # shard only the optimizer state over data x fsdp (params replicated)
    microbatches: int | None = None  # pipeline microbatches per forward pass (None: = stages)
    pipeline_repeats: int = 1  # > 1: circular pipeline, each stage holds this many layer groups
    lr: float = 4e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 30
    decay_steps: int | None = None  # the schedule's length (None: train.steps); set it to stop
    # early and extend a run later on the same schedule
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 disables it
    loss_scale: float = 32768.0  # initial dynamic loss scale, used only with float16 compute
    loss_scale_period: int = 1000  # finite steps before the float16 loss scale doubles
    time_limit: str | None = None  # "HH:MM:SS" or seconds: then save and exit 75 to be requeued
    max_bad_steps: int = 5  # bad steps in a row before rolling back to the last checkpoint
    spike_sigma: float = 0.0  # a loss above mean + k sigma of the window is a bad step (0: off)
    spike_window: int = 100  # recent steps the spike statistics are taken over
    eval_every: int = 50  # validation loss after step 1, every this many steps, and at the end
    eval_batches: int = 16  # held-out global batches per validation (fewer if the split is small)
    peak_tflops: float | None = None  # per device, for MFU (None: by device kind; on CPU measured)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # "stdlib" (the interpreter's standard library, tokenized into $JAXLM_CACHE on first use),
    # a directory made by `python -m jaxlm.data prepare`, or "synthetic"
    source: str = "stdlib"
    tokenizer: str | None = None  # if set, refuse shards that another tokenizer made
    cross_document_attention: bool = False  # false: packed documents do not see each other
    threads: int = 1  # grain reader threads (0: read in the training thread)
    prefetch: int = 4  # batches read ahead
    verify: bool = True  # check every shard's CRC-32 when training starts


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (also one at the end); 0: only at the end
    keep: int = 3  # newest checkpoints kept
    keep_every: int = 0  # also keep every checkpoint whose step divides by this, forever (0: none)
    init_from: str | None = None  # start a new run from the params of another run's checkpoint
    async_save: bool = True  # write in the background while training goes on


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    init_timeout: int = 120  # seconds to wait for every process to join
    heartbeat_timeout: int = 100  # seconds without a heartbeat before the others give up


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    # XLA flag preset applied before JAX starts (jaxlm/backend.py); flags already in XLA_FLAGS win
    xla_flags: Literal["auto", "cuda", "rocm", "cpu", "none"] = "auto"


@dataclasses.dataclass(frozen=True)
class DebugConfig:
    """Test hooks: ways to make a run fail on purpose."""

    nan_at_step: int | None = None  # poison the batch that step N of the run would consume
    nan_steps: int = 1  # ... and this many batches after it


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every: int = 10  # plain log lines (when not on a terminal) every this many steps
    tensorboard: bool = True
    energy: bool = True  # sample device power (NVML, rocm-smi, RAPL) where it can be read
    carbon_intensity: float | None = None  # kg CO2 per kWh of the site's electricity: logs co2_kg


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()
    log: LogConfig = LogConfig()
    backend: BackendConfig = BackendConfig()
    debug: DebugConfig = DebugConfig()
    mesh: str = "dp=-1"  # a mesh spec ("dp=2,tp=4") or the name of a preset in meshes/


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How `python -m jaxlm.generate` draws tokens (jaxlm/generation.py)."""

    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1: no limit

    def check(self) -> None:
        if self.temperature < 0:
            raise UsageError(f"--temperature must be 0 (greedy) or more, not {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be 0 (off) or more, not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1], not {self.top_p}")


# --- presets -----------------------------------------------------------------------------------

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


def preset_dir(kind: str) -> pathlib.Path:
    """Where the `configs` or `meshes` presets live: inside an installed wheel, else the repo."""
    for candidate in (_PACKAGE_DIR / "_presets" / kind, _PACKAGE_DIR.parent / kind):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no {kind}/ preset directory next to {_PACKAGE_DIR}")


_PRESET_LABELS = {"configs": "config", "meshes": "mesh"}


def read_preset(kind: str, name_or_path: str) -> dict:
    """The YAML mapping of a preset name (configs/NAME.yaml) or of a YAML file path."""
    path = pathlib.Path(name_or_path)
    if not path.is_file():
        directory = preset_dir(kind)
        path = directory / f"{name_or_path}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in directory.glob("*.yaml"))
            close = difflib.get_close_matches(name_or_path, names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UsageError(
                f"unknown {_PRESET_LABELS[kind]} preset '{name_or_path}': {hint}"
                f"available: {', '.join(names)} (or give a path to a YAML file)"
            )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"{path} is not valid YAML: {e}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a mapping of keys to values")
    return data


# --- building a config ----------------------------------------------------------------------------


def load(preset: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the preset (name or YAML path), then `key=value` overrides, in that order."""
    cfg = Config()
    if preset:
        cfg = merge(cfg, read_preset("configs", preset), source=f"preset '{preset}'")
    return validate(apply_overrides(cfg, overrides))


def validate(cfg: Config) -> Config:
    """Checks that need only the config (the mesh-dependent ones live in jaxlm/sharding.py)."""
    m, t = cfg.model, cfg.train
    for key, value in [
        ("model.vocab_size", m.vocab_size),
        ("model.d_model", m.d_model),
        ("model.n_layers", m.n_layers),
        ("model.n_heads", m.n_heads),
        ("model.d_ff", m.d_ff),
        ("train.steps", t.steps),
        ("train.global_batch_size", t.global_batch_size),
        ("train.seq_len", t.seq_len),
    ]:
        if value < 1:
            raise UsageError(f"{key} must be at least 1, not {value}")
    if m.head_dim is None and m.d_model % m.n_heads:
        raise UsageError(
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}: "
            f"set model.head_dim or choose sizes that divide"
        )
    if m.n_heads % m.kv_heads:
        raise UsageError(f"model.n_kv_heads={m.kv_heads} must divide model.n_heads={m.n_heads}")
    if m.positions == "rope" and m.dim_per_head % 2:
        raise UsageError(f"rotary positions need an even head dimension, not {m.dim_per_head}")
    if t.time_limit is not None:
        parse_duration(t.time_limit)
    if t.peak_tflops is not None and t.peak_tflops <= 0:
        raise UsageError(f"train.peak_tflops must be positive, not {t.peak_tflops}")
    if cfg.log.carbon_intensity is not None and cfg.log.carbon_intensity < 0:
        raise UsageError(
            f"log.carbon_intensity must not be negative, not {cfg.log.carbon_intensity}"
        )
    if m.positions == "learned" and t.seq_len > m.max_seq_len:
        raise UsageError(
            f"train.seq_len={t.seq_len} is longer than the learned position table "
            f"(model.max_seq_len={m.max_seq_len})"
        )
    return cfg


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    updates: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"expected key=value, got '{item}' (e.g. train.steps=100)")
        updates[key.strip()] = value.strip()
    return merge(cfg, _nest(updates), source="the command line", from_text=True)


def merge(cfg: Config, updates: dict, *, source: str, from_text: bool = False) -> Config:
    """`cfg` with the nested mapping `updates` applied; every key and value is checked."""
    return _merge_dataclass(cfg, updates, prefix="", source=source, from_text=from_text)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    return validate(merge(Config(), data, source="a saved config"))


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def all_keys(cfg: Config | None = None) -> list[str]:
    """Every dotted key a config accepts, e.g. 'model.d_model'."""
    cfg = cfg or Config()
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += [f"{f.name}.{sub.name}" for sub in dataclasses.fields(value)]
        else:
            keys.append(f.name)
    return keys


def _nest(flat: dict[str, Any]) -> dict:
    nested: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UsageError(f"'{key}' sets a key below '{p}', which is not a section")
        node[leaf] = value
    return nested


def _merge_dataclass(obj, updates: dict, *, prefix: str, source: str, from_text: bool):
    if not isinstance(updates, dict):
        raise UsageError(f"'{prefix.rstrip('.')}' in {source} must be a mapping of keys to values")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in fields:
            while isinstance(value, dict) and len(value) == 1:  # name the whole dotted key
                ((sub, value),) = value.items()
                key = f"{key}.{sub}"
            close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.7)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UsageError(f"unknown config key '{key}' in {source}{hint}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            changes[name] = _merge_dataclass(
                current, value, prefix=f"{key}.", source=source, from_text=from_text
            )
        else:
            changes[name] = _coerce(value, hints[name], key, source, from_text)
    return dataclasses.replace(obj, **changes)


def _coerce(value: Any, annotation: Any, key: str, source: str, from_text: bool) -> Any:
    """`value` as the type `annotation` asks for, or a UsageError that names the key."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):  # `T | None`
        if value is None or (from_text and str(value).lower() in ("none", "null")):
            return None
        (annotation,) = [a for a in args if a is not type(None)]
        return _coerce(value, annotation, key, source, from_text)
    if origin is Literal:
        if value not in args:
            raise UsageError(
                f"{key} must be one of {', '.join(map(str, args))}, not '{value}' ({source})"
            )
        return value
    if annotation is str:
        return str(value)
    if from_text and isinstance(value, str):
        value = yaml.safe_load(value) if value else value
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML reads "1e-3" as a string; float() does not
        except ValueError:
            pass
    raise UsageError(f"{key} must be {annotation.__name__}, not '{value}' ({source})")


def parse_duration(text: str) -> float:
    """'HH:MM:SS', 'MM:SS' or plain seconds -> seconds."""
    try:
        parts = [float(p) for p in str(text).split(":")]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts):
        raise UsageError(f"train.time_limit must be seconds or HH:MM:SS, not '{text}'")
    seconds = 0.0
    for p in parts:
        seconds = seconds * 60 + p
    return seconds
