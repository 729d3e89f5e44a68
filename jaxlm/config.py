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

from jaxlm import domain
from jaxlm import trackers as trackers_lib
from jaxlm.data import blend
from jaxlm.data.megatron_order import DEFAULT_SPLIT, parse_split
from jaxlm.domain import (
    Duration,
    NonEmpty,
    Parsed,
    Range,
    at_least,
    check_fields,
    fraction,
    non_negative,
    positive,
)
from jaxlm.errors import UsageError
from jaxlm.watchdog import parse_timeout

DType = Literal["float32", "bfloat16", "float16"]


def setting(default, domain):
    """A config field with the values it accepts (jaxlm/domain.py), checked by `validate`."""
    return dataclasses.field(default=default, metadata={"domain": domain})


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequencies stretched for a context longer than pretraining's, as Hugging Face's
    `rope_scaling` (or `rope_parameters`) in config.json.

    `llama3` (Llama 3.1 and later): with W = original_max_position_embeddings, wavelengths longer
    than W / low_freq_factor are stretched `factor` times, those shorter than W /
    high_freq_factor are kept, and the band between is interpolated smoothly. `default`: the
    frequencies of `rope_theta` as they are (the other fields are then unused).
    """

    rope_type: Literal["default", "llama3"] = "default"
    factor: float = setting(8.0, Range(low=1))
    low_freq_factor: float = setting(1.0, positive())
    high_freq_factor: float = setting(4.0, positive())
    # the context the model was pretrained on before it was extended
    original_max_position_embeddings: int = setting(8192, at_least(1))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the decoder-only transformer (see jaxlm/model).

    The defaults are the small model that `python -m jaxlm.train` trains on the default corpus:
    2.1 M parameters whose validation loss falls from ln(4096) = 8.3 to about 4.8 in 300 steps,
    in 3 to 7 minutes on two CPU cores.
    """

    vocab_size: int = setting(4096, at_least(1))
    d_model: int = setting(128, at_least(1))
    n_layers: int = setting(4, at_least(1))
    n_heads: int = setting(4, at_least(1))
    # None: as many as n_heads (plain multi-head attention)
    n_kv_heads: int | None = setting(None, at_least(1))
    head_dim: int | None = setting(None, at_least(1))  # None: d_model // n_heads
    d_ff: int = setting(512, at_least(1))
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = setting(1e-5, positive())
    positions: Literal["rope", "learned"] = "rope"
    rope_theta: float = setting(10000.0, positive())
    rope_scaling: RopeScaling = RopeScaling()
    # size of the learned position table; the longest usable context
    max_seq_len: int = setting(2048, at_least(1))
    tie_embeddings: bool = False
    use_bias: bool = False
    init_std: float = setting(0.02, positive())
    compute_dtype: DType = "bfloat16"  # parameters stay float32; matmuls run in this dtype
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    # attention over a sequence split by the context axis (jaxlm/model/context.py): keys and
    # values passed round a ring, or gathered whole on every device; auto: gathered for cp=2
    context_attention: Literal["auto", "ring", "all_gather"] = "auto"
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

    steps: int = setting(300, at_least(1))
    seed: int = setting(0, at_least(0))
    # sequences per optimizer step, over all devices
    global_batch_size: int = setting(32, at_least(1))
    # sequences per data-parallel replica per forward pass;
    # None: global_batch_size / data-parallel size, i.e. no gradient accumulation
    micro_batch_size: int | None = setting(None, at_least(1))
    seq_len: int = setting(128, at_least(1))
    zero1: bool = False  # shard only the optimizer state over data x fsdp (params replicated)
    # pipeline microbatches per forward pass (None: the replica's micro batch, one sequence each)
    microbatches: int | None = setting(None, at_least(1))
    # > 1: each stage holds this many layer groups (the circular and interleaved schedules)
    pipeline_repeats: int = setting(1, at_least(1))
    # gpipe: all forwards, then all backwards (activations of every microbatch kept);
    # circular: GPipe over pipeline_repeats layer groups per stage;
    # 1f1b: one forward and one backward per stage per iteration, at most 2 x stages - 1
    # microbatches' layer inputs kept (jaxlm/model/pipeline_1f1b.py); interleaved with
    # pipeline_repeats > 1
    pipeline_schedule: Literal["gpipe", "circular", "1f1b"] = "gpipe"
    # > 1: the head and loss run on this many slices of each forward pass's rows in turn,
    # recomputed in the backward pass, so only one slice's logits are alive at a time
    loss_chunks: int = setting(1, at_least(1))
    # 0 is allowed: it freezes the weights (a run that only evaluates, or fine-tunes nothing)
    lr: float = setting(4e-3, non_negative())
    min_lr_ratio: float = setting(0.1, fraction())  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = setting(30, at_least(0))
    # the schedule's length (None: train.steps); set it to stop early and extend a run later on
    # the same schedule
    decay_steps: int | None = setting(None, at_least(1))
    weight_decay: float = setting(0.1, non_negative())
    beta1: float = setting(0.9, fraction(high_open=True))
    beta2: float = setting(0.95, fraction(high_open=True))
    adam_eps: float = setting(1e-8, positive())
    grad_clip: float = setting(1.0, non_negative())  # global-norm clipping; 0 disables it
    # initial dynamic loss scale, used only with float16 compute
    loss_scale: float = setting(32768.0, Range(low=1))
    # finite steps before the float16 loss scale doubles
    loss_scale_period: int = setting(1000, at_least(1))
    # "HH:MM:SS" or seconds: then save and exit 75 to be requeued
    time_limit: str | None = setting(None, Duration())
    # a phase of the loop (a step, a validation, a save) that lasts longer ends the process with
    # exit code 76 (jaxlm/watchdog.py): seconds, "auto" (20 x its median, at least 300 s), "off"
    step_timeout: str = setting(
        "auto", Parsed(parse_timeout, "'auto', 'off' or positive seconds", ("0", "-5", "soon"))
    )
    # every this many steps the processes' host times are compared (jaxlm/stragglers.py); 0: off
    straggler_every: int = setting(50, at_least(0))
    # a process whose host time per step exceeds the others' median by more than this fraction
    # of the step time, two intervals in a row, is named a straggler
    straggler_margin: float = setting(0.1, positive())
    # bad steps in a row before rolling back to the last checkpoint
    max_bad_steps: int = setting(5, at_least(1))
    # a loss above mean + k sigma of the window is a bad step (0: off)
    spike_sigma: float = setting(0.0, non_negative())
    # recent steps the spike statistics are taken over
    spike_window: int = setting(100, at_least(2))
    # validation loss after step 1, every this many steps, and at the end
    eval_every: int = setting(50, at_least(0))
    # held-out global batches per validation (fewer if the split is small)
    eval_batches: int = setting(16, at_least(1))
    # per device, for MFU (None: by device kind; on CPU measured)
    peak_tflops: float | None = setting(None, positive())


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # "stdlib" (the interpreter's standard library, tokenized into $JAXLM_CACHE on first use),
    # a directory made by `python -m jaxlm.data prepare`, "megatron:PREFIX" (Megatron-LM's
    # PREFIX.bin + .idx), "synthetic", or a blend: "0.7 megatron:/data/web 0.3 /data/code" (or a
    # YAML list of {source, weight}, or a mapping source: weight)
    source: str = setting(
        "stdlib",
        Parsed(
            blend.parse,
            "a source, or pairs of positive weight and source",
            ("", "0.5 a b", "-1 a 2 b", "nan a 1 b", "0 a 0 b", "1 a 1 a"),
        ),
    )
    # "jaxlm": documents shuffled each epoch, packed into windows that do not overlap;
    # "megatron": Megatron-LM GPTDataset's samples, token for token (jaxlm/data/megatron_order.py)
    order: Literal["jaxlm", "megatron"] = "jaxlm"
    # Megatron's train,validation,test split of a Megatron prefix's documents
    split: str = setting(
        DEFAULT_SPLIT,
        Parsed(parse_split, "Megatron's split string, e.g. '969,30,1'", ("", "0,0,0", "1,2,3,4")),
    )
    # where sample indices are cached (None: a cache/ directory beside the data)
    cache_dir: str | None = setting(None, NonEmpty())
    # if set, refuse shards that another tokenizer made
    tokenizer: str | None = setting(None, NonEmpty())
    cross_document_attention: bool = False  # false: packed documents do not see each other
    # "text": documents as they are, every token trained; "chat": JSONL rows of {"messages":
    # [{"role", "content"}, ...]} rendered by a chat template, only the assistant's tokens
    # trained (jaxlm/data/chat.py). Prepared directories carry their own format.
    format: Literal["text", "chat"] = "text"
    # the chat template: a Jinja file, or a Hugging Face tokenizer_config.json holding one
    # (None: that of checkpoint.init_from's run where it has one, else the built-in template)
    chat_template: str | None = setting(None, NonEmpty())
    # "packed": documents streamed into windows (one may continue in the next window);
    # "padded": one document per window, cut at seq_len + 1 tokens, the rest untrained padding
    packing: Literal["packed", "padded"] = "packed"
    threads: int = setting(1, at_least(0))  # grain reader threads (0: read in the training thread)
    prefetch: int = setting(4, at_least(1))  # batches read ahead
    verify: bool = True  # check every shard's CRC-32 when training starts


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    # steps between checkpoints (also one at the end); 0: only at the end
    every: int = setting(100, at_least(0))
    keep: int = setting(3, at_least(1))  # newest checkpoints kept
    # also keep every checkpoint whose step divides by this, forever (0: none)
    keep_every: int = setting(0, at_least(0))
    # start a new run from the params of another run's checkpoint
    init_from: str | None = setting(None, NonEmpty())
    async_save: bool = True  # write in the background while training goes on


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    init_timeout: int = setting(120, at_least(1))  # seconds to wait for every process to join
    # seconds without a heartbeat before the others give up
    heartbeat_timeout: int = setting(100, at_least(1))


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    # XLA flag preset applied before JAX starts (jaxlm/backend.py); flags already in XLA_FLAGS win
    xla_flags: Literal["auto", "cuda", "rocm", "cpu", "none"] = "auto"


@dataclasses.dataclass(frozen=True)
class DebugConfig:
    """Test hooks: ways to make a run fail on purpose."""

    # poison the batch that step N of the run would consume
    nan_at_step: int | None = setting(None, at_least(1))
    nan_steps: int = setting(1, at_least(1))  # ... and this many batches after it
    # process `hang_process` stops making progress before step N, in a run that did not resume
    # (the watchdog's tests: a requeued run goes on)
    hang_at_step: int | None = setting(None, at_least(1))
    hang_process: int = setting(0, at_least(0))
    # process `slow_process` runs `slow_factor` times slower: its training steps (host-side
    # delay before each) and its collectives in `python -m jaxlm.doctor` (the straggler tests)
    slow_process: int | None = setting(None, at_least(0))
    slow_factor: float = setting(3.0, Range(low=1))


@dataclasses.dataclass(frozen=True)
class LogConfig:
    # plain log lines (when not on a terminal) every this many steps
    every: int = setting(10, at_least(1))
    # where the rows of metrics.jsonl also go: tensorboard, wandb, mlflow (jaxlm/trackers.py);
    # a YAML list or a comma string, empty for none
    trackers: tuple[str, ...] = setting(
        ("tensorboard",),
        Parsed(
            trackers_lib.parse,
            "a list of tensorboard, wandb, mlflow",
            (("tensorboard", "tensorbored"), ("mlflow", "mlflow")),
        ),
    )
    # false leaves TensorBoard out of log.trackers (the older switch)
    tensorboard: bool = True
    # MLflow's tracking URI (None: a file store RUN/mlruns), e.g. http://mlflow.example:5000
    mlflow_uri: str | None = setting(None, NonEmpty())
    energy: bool = True  # sample device power (NVML, rocm-smi, RAPL) where it can be read
    # kg CO2 per kWh of the site's electricity: logs co2_kg
    carbon_intensity: float | None = setting(None, non_negative())


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
    # a mesh spec ("dp=2,tp=4") or the name of a preset in meshes/
    mesh: str = setting("dp=-1", NonEmpty())


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How `python -m jaxlm.generate` draws tokens (jaxlm/generation.py)."""

    temperature: float = setting(0.8, non_negative())  # 0: greedy
    top_k: int = setting(0, at_least(0))  # 0: no limit
    top_p: float = setting(1.0, Range(low=0, high=1, low_open=True))  # 1: no limit

    def check(self) -> None:
        check_fields(self, flags=True)  # as the flags of generate


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
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{path} is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}): save it "
            f"as UTF-8"
        ) from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
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
    check_fields(cfg)
    m, t = cfg.model, cfg.train
    if m.head_dim is None and m.d_model % m.n_heads:
        raise UsageError(
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}: "
            f"set model.head_dim or choose sizes that divide"
        )
    if m.n_heads % m.kv_heads:
        raise UsageError(f"model.n_kv_heads={m.kv_heads} must divide model.n_heads={m.n_heads}")
    if m.positions == "rope" and m.dim_per_head % 2:
        raise UsageError(f"rotary positions need an even head dimension, not {m.dim_per_head}")
    scaling = m.rope_scaling
    if scaling.rope_type == "llama3" and scaling.high_freq_factor <= scaling.low_freq_factor:
        raise UsageError(
            f"model.rope_scaling.high_freq_factor={scaling.high_freq_factor:g} must be larger "
            f"than model.rope_scaling.low_freq_factor={scaling.low_freq_factor:g}"
        )
    d = cfg.data
    if d.packing == "padded" and d.order == "megatron":
        raise UsageError(
            "data.packing=padded needs data.order=jaxlm: Megatron's samples are packed windows"
        )
    if d.chat_template and d.format != "chat":
        raise UsageError("data.chat_template is set but data.format is not chat")
    if t.seq_len > m.max_seq_len:  # rotary positions too: beyond it the model never trained
        raise UsageError(
            f"train.seq_len={t.seq_len} is longer than the model's context "
            f"(model.max_seq_len={m.max_seq_len}): raise model.max_seq_len or shorten the sequence"
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
            keys += [f"{f.name}.{key}" for key in all_keys(value)]
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
        return blend.to_text(value) if key == "data.source" else str(value)
    if origin is tuple:  # tuple[str, ...]: a YAML list, or a comma string ("" for none)
        if from_text and isinstance(value, str) and value.startswith("["):
            value = yaml.safe_load(value)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise UsageError(f"{key} must be a list of names, not '{value}' ({source})")
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
    seconds = domain.parse_duration(text)
    if seconds is None:
        raise UsageError(f"train.time_limit must be seconds or HH:MM:SS, not '{text}'")
    return seconds
