"""Experiment configuration: a typed schema, YAML loading, ``--set`` overrides and validation.

A config is a YAML file with the sections ``data``, ``model``, ``loss``, ``train``, ``lms`` and
``output``. Every key has a default, so a file holding only ``data.root`` is valid::

    from lmstrain.config import load_config
    config = load_config("configs/demo.yaml", overrides=["train.epochs=3", "data.shape=[32,32,32]"])
    config.train.epochs  # 3

Relative paths written in the YAML file are relative to the file's folder; relative paths given
with ``--set`` are relative to the current directory. Both are stored as absolute paths.
"""

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from lmstrain.atomic import write_text
from lmstrain.errors import ConfigError, UserError
from lmstrain.lms.errors import LMSParameterError
from lmstrain.lms.settings import SwapSettings
from lmstrain.units import parse_bytes


def _key(default, help, **checks):
    """A schema field: its default, a one-line help text and optional checks.

    Checks: ``min``/``max`` (inclusive bounds), ``gt`` (exclusive lower bound), ``length`` (for
    lists), ``path`` (resolve to an absolute path), ``bytes`` (parse sizes such as ``16GiB``).
    """
    metadata = {"help": help, **checks}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    root: Optional[str] = _key(None, "Folder holding the BraTS cases (searched recursively).", path=True)
    layout: Literal["auto", "brats2018", "brats2020", "brats2021", "brats2023", "msd"] = _key(
        "auto", "Dataset layout; `auto` detects it from the file names.")
    shape: list[int] = _key([128, 128, 128], "Network input size (x, y, z) after preprocessing.",
                            length=3, min=1)
    val_fraction: float = _key(0.2, "Share of cases held out for validation (split by "
                                    "data.split_seed).", gt=0.0, max=0.9)
    split_seed: Optional[int] = _key(
        None, "Seed of the train/validation split; null = train.seed. Set it to train with "
              "other train.seed values on the same split.", min=0)
    max_cases: Optional[int] = _key(None, "Use only the first N cases (sorted by id); null = all.", min=2)
    resize: Literal["resample", "crop_pad"] = _key(
        "resample", "Bring the brain box to data.shape by resampling (SimpleITK), or by centred "
                    "crop/pad at native resolution (prediction then uses a sliding window).")
    n4: bool = _key(False, "N4 bias-field correction (SimpleITK) before normalisation.")
    on_error: Literal["fail", "skip"] = _key(
        "fail", "A case that cannot be read: stop with an error (fail), or warn and leave it out.")
    flip: bool = _key(True, "Random flips along each axis during training.")
    cache_dir: Optional[str] = _key(
        None, "Where preprocessed volumes are cached; null = $XDG_CACHE_HOME/lmstrain "
              "(~/.cache/lmstrain).", path=True)


@dataclass
class ModelConfig:
    name: Literal["isensee2017", "unet"] = _key(
        "isensee2017", "Network: Isensee et al. 2017 3D U-Net, or a plain 3D U-Net.")
    base_filters: int = _key(16, "Filters at the top level; doubled at each level below.", min=1)
    depth: int = _key(5, "Number of resolution levels; input edges must divide by 2**(depth-1).",
                      min=2, max=8)
    norm: Literal["instance", "instance_lean", "batch", "none"] = _key(
        "instance", "Normalisation after each conv. instance_lean: instance normalisation with "
                    "a gradient that holds three full-size tensors instead of Keras's four (the "
                    "same layer mathematically and the same weights; a lower backward peak).")
    dropout: float = _key(0.3, "Spatial dropout rate in the context modules (isensee2017).", min=0.0,
                          max=0.9)
    deep_supervision: bool = _key(True, "Sum segmentation outputs of the 3 finest decoder levels "
                                        "(isensee2017).")
    split_concat: bool = _key(False, "Compute each decoder conv over [skip, upsampled] as the sum "
                                     "of convs over the two parts: the same layer and weights, "
                                     "no concatenated tensor (less memory).")
    remat: Literal["none", "keras_full", "keras_larger_than", "keras_activations", "keras_layers",
                   "blocks"] = _key(
        "none", "Recompute activations in the backward pass instead of keeping them (swapping's "
                "peers, make bench-peers). keras_<mode>: the network built inside "
                "keras.RematScope(mode) (keras_layers: list_of_layers naming the context and "
                "localisation modules' conv, norm and activation layers; keras_full and "
                "keras_larger_than fail in model.fit on Keras 3.15); blocks: each context and "
                "localisation module of isensee2017 in tf.recompute_grad.")


@dataclass
class LossConfig:
    name: Literal["dice", "dice_bce"] = _key(
        "dice", "Soft dice over the WT/TC/ET regions (Isensee's weighted dice), or dice + BCE.")
    smooth: float = _key(1e-5, "Smoothing term of the soft dice.", gt=0.0)


@dataclass
class TrainConfig:
    epochs: int = _key(50, "Total number of epochs (a resumed run continues to this number).", min=1)
    batch_size: int = _key(2, "Volumes per training step on each device (per replica); the "
                              "global batch is this times the number of replicas.", min=1)
    steps_per_epoch: Optional[int] = _key(
        None, "Cap on training steps per epoch; null = one pass over the training cases.", min=1)
    seed: int = _key(0, "Seed for the weights and augmentation, and for the train/validation "
                        "split unless data.split_seed is set.", min=0)
    optimizer: Literal["adam", "adamw", "sgd"] = _key("adam", "Optimizer.")
    learning_rate: float = _key(5e-4, "Initial learning rate.", gt=0.0)
    lr_schedule: Literal["constant", "plateau", "cosine", "poly"] = _key(
        "constant", "constant; plateau (halve after 10 epochs without val_loss improvement); "
                    "cosine or poly (power 0.9) decay over all epochs.")
    mixed_precision: bool = _key(False, "Train in mixed_float16 (GPU); weights stay float32.")
    steps_per_execution: int = _key(1, "Training steps per traced function call (Keras).", min=1)
    distribute: Literal["none", "mirrored", "multi_worker"] = _key(
        "none", "none: one device; mirrored: data-parallel over train.devices "
                "(tf.distribute.MirroredStrategy), one replica per device; multi_worker: "
                "data-parallel over several processes or machines "
                "(tf.distribute.MultiWorkerMirroredStrategy; cluster from TF_CONFIG or Slurm, "
                "or `lmstrain fit --workers N`), every local GPU (without one, /CPU:0) a "
                "replica.")
    devices: Optional[list[str]] = _key(
        None, "The replicas' devices for mirrored, e.g. [/GPU:0, /GPU:1]; null = every local "
              "GPU, or without a GPU two logical CPUs (for testing; no speed-up).")
    worker_timeout: int = _key(
        60, "multi_worker: seconds a worker may go without a heartbeat before the others stop "
            "with an error naming it (TensorFlow's coordination service).", min=1)


def _swap_keys():
    """The ``lms.*`` keys of the swap settings, declared once in
    :class:`lmstrain.lms.SwapSettings` (type, default, help text, minimum)."""
    for f in dataclasses.fields(SwapSettings):
        if f.type == tuple[str, ...]:
            yield f.name, list[str], _key(list(f.default), f.metadata["help"])
        else:
            checks = {"min": f.metadata["min"]} if "min" in f.metadata else {}
            yield f.name, f.type, _key(f.default, f.metadata["help"], **checks)


LmsConfig = dataclasses.make_dataclass("LmsConfig", [
    ("enabled", Union[bool, Literal["auto"]], _key(
        False, "Swap activations to host memory (true/false; `auto` = only when predicted to "
               "need it).")),
    *_swap_keys(),
    ("host_device", Optional[str], _key(
        None, "Where swapped tensors live; null = /CPU:0, or /CPU:1 in the CPU-only emulation.")),
    ("compute_device", Optional[str], _key(None, "Where the model runs; null = detected.")),
    ("copy_mode", Literal["snapshot", "deepcopy"], _key(
        "snapshot", "Swap node op: snapshot (GPU), or deepcopy to force real copies on CPU "
                    "(measurement mode).")),
    ("autotune", bool, _key(False, "Choose the swap settings that fit lms.device_memory.")),
    ("device_memory", Optional[int], _key(
        None, "Device memory budget for auto-tune and checks, e.g. 16GiB; null = the device's.",
        bytes=True, gt=0)),
    ("verify", bool, _key(False, "Log, per traced function, how many swap nodes survive "
                                 "Grappler.")),
])


@dataclass
class OutputConfig:
    root: str = _key("runs", "Folder where run directories are created.", path=True)
    name: Optional[str] = _key(None, "Run name prefix; null = the config file's name.")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lms: LmsConfig = field(default_factory=LmsConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_yaml(self):
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False)


class _Dumper(yaml.SafeDumper):
    """Block-style sections with short flow-style lists (``shape: [128, 128, 128]``)."""


_Dumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value,
                                                          flow_style=True))


def schema_keys():
    """Yield ``(dotted_key, type, default, help)`` for every config key, in schema order."""
    for section in dataclasses.fields(Config):
        section_cls = section.default_factory
        hints = get_type_hints(section_cls)
        for f in dataclasses.fields(section_cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            yield f"{section.name}.{f.name}", hints[f.name], default, f.metadata["help"]


def load_config(path, overrides=()):
    """Load, override and validate a config file; return a :class:`Config`.

    ``overrides`` are ``"section.key=value"`` strings whose values are parsed as YAML
    (``"data.shape=[32,32,32]"``). Raises :class:`ConfigError` naming the offending key.
    Only the schema is checked; whether ``data.root`` exists is up to the command using it.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#x} at offset "
                          f"{err.start}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(err)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, ...), "
                          f"got {type(raw).__name__}")
    raw = _resolve_paths(raw, path.resolve().parent)
    raw.setdefault("output", {})
    if isinstance(raw["output"], dict) and raw["output"].get("name") is None:
        raw["output"]["name"] = path.stem
    return config_from_dict(raw, overrides)


def config_from_dict(raw, overrides=()):
    """Validate a raw mapping (plus ``--set`` overrides, relative to the cwd) into a Config."""
    raw = apply_overrides(raw, overrides)
    config = _build(Config, raw, "")
    swap_settings(config)  # the swap settings' own checks, before anything runs
    _check_shape(config)
    _check_recompute(config)
    _check_distribute(config)
    _check_run_name(config.output.name)
    for dotted, _tp, _default, _help in schema_keys():  # defaults such as output.root: runs
        section, name = dotted.split(".")
        value = getattr(getattr(config, section), name)
        if _field_meta(section, name).get("path") and value and not os.path.isabs(value):
            setattr(getattr(config, section), name, _resolve(Path(value), dotted))
    return config


def apply_overrides(raw, overrides):
    """Return a copy of ``raw`` with each ``section.key=value`` override applied."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set expects section.key=value (e.g. train.epochs=3), got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: cannot parse {text!r} as a YAML value") from None
        section, name = parts
        if not isinstance(raw.get(section, {}), dict):
            raise ConfigError(f"{section}: expected a mapping, got {raw[section]!r}")
        raw.setdefault(section, {})
        raw[section] = {**raw[section], name: value}
        raw = _resolve_paths(raw, Path.cwd(), only=(section, name))
    return raw


def swap_settings(config: "Config") -> SwapSettings:
    """The :class:`~lmstrain.lms.SwapSettings` named by ``config.lms``; raises
    :class:`ConfigError` naming the key when they are invalid."""
    try:
        return SwapSettings.from_mapping(vars(config.lms))
    except LMSParameterError as error:
        raise ConfigError(f"lms.{error.key}: {error}") from None


def split_seed(config: "Config") -> int:
    """The seed of the train/validation split: ``data.split_seed``, else ``train.seed``."""
    return config.train.seed if config.data.split_seed is None else config.data.split_seed


def save_config(config, path):
    """Write ``config`` as YAML to ``path`` atomically (temp file, then rename)."""
    write_text(path, config.to_yaml())


def require_data_root(config):
    """Raise a UserError unless ``data.root`` is set and is an existing folder."""
    root = config.data.root
    if root is None:
        raise UserError("data.root is not set: add `data: {root: /path/to/BraTS}` to the config "
                        "or pass --set data.root=/path/to/BraTS")
    if not Path(root).is_dir():
        raise UserError(f"data.root {root} does not exist or is not a folder; point it at your "
                        "BraTS folder (see data/README.md) or create synthetic data with "
                        "`lmstrain synth`")
    return Path(root)


# --- validation -------------------------------------------------------------------------------

def _resolve_paths(raw, base, only=None):
    """Make path-valued keys absolute relative to ``base`` (all of them, or just ``only``)."""
    for dotted, _tp, _default, _help in schema_keys():
        section, name = dotted.split(".")
        if only is not None and (section, name) != only:
            continue
        meta = _field_meta(section, name)
        value = raw.get(section, {}).get(name) if isinstance(raw.get(section), dict) else None
        if meta.get("path") and isinstance(value, str) and value:
            raw[section] = {**raw[section], name: _resolve(base / Path(value).expanduser(), dotted)}
    return raw


def _resolve(path, key):
    """``path`` made absolute with symbolic links resolved; a ConfigError naming ``key`` when
    that is impossible (a symbolic link loop)."""
    try:
        return str(path.resolve())
    except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop before Python 3.13
        raise ConfigError(f"{key}: cannot resolve {path}: a symbolic link loop or an unreadable "
                          "folder; fix the link or choose another path") from None


def _field_meta(section, name):
    section_cls = {f.name: f.default_factory for f in dataclasses.fields(Config)}[section]
    return {f.name: f.metadata for f in dataclasses.fields(section_cls)}[name]


def _build(cls, raw, prefix):
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(_unknown_key_message(f"{prefix}{key}", key, list(fields)))
    hints = get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], raw[name] or {}, f"{prefix}{name}.")
        else:
            values[name] = _check(raw[name], hints[name], f.metadata, f"{prefix}{name}")
    return cls(**values)


def _unknown_key_message(dotted, key, valid):
    parent = dotted.rpartition(".")[0]
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    hint = f"did you mean '{parent + '.' if parent else ''}{close[0]}'? " if close else ""
    return f"unknown key '{dotted}': {hint}valid keys here are {', '.join(valid)}"


def _check(value, tp, meta, path):
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: must be a finite number, got {value!r}")
    if meta.get("bytes") and value is not None:
        try:
            value = parse_bytes(value)
        except UserError as err:
            raise ConfigError(f"{path}: {err}") from None
    else:
        value = _check_type(value, tp, path)
    _check_range(value, meta, path)
    return value


def _check_type(value, tp, path):
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: expected {describe_type(tp)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{path}: expected one of {', '.join(map(str, args))}, got {value!r}{hint}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {describe_type(tp)}, got {value!r}")
        return [_check_type(item, args[0], f"{path}[{i}]") for i, item in enumerate(value)]
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "5e-4" (no dot) as a string; accept it as the number it means.
            number = float(value)
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            return number
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{path}: expected {describe_type(tp)}, got {value!r}")


def describe_type(tp):
    """How a type reads in messages and docs: ``Optional[int]`` -> "an integer or null"."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        return " or ".join("null" if a is type(None) else describe_type(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is list:
        return f"a list of {_PLURAL[args[0]]}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


_PLURAL = {int: "integers", float: "numbers", str: "strings"}


def _check_range(value, meta, path):
    if value is None:
        return
    if "length" in meta and len(value) != meta["length"]:
        raise ConfigError(f"{path}: expected {meta['length']} values, got {value!r}")
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        if "min" in meta and item < meta["min"]:
            raise ConfigError(f"{path}: must be at least {meta['min']}, got {value!r}")
        if "max" in meta and item > meta["max"]:
            raise ConfigError(f"{path}: must be at most {meta['max']}, got {value!r}")
        if "gt" in meta and item <= meta["gt"]:
            raise ConfigError(f"{path}: must be greater than {meta['gt']}, got {value!r}")


def divisor(depth: int) -> int:
    """Every input edge must be a multiple of this for a U-Net of ``depth`` levels."""
    return 2 ** (depth - 1)


def misfit_edges(shape, depth: int) -> tuple[list[int], list[int]]:
    """The edges of ``shape`` a U-Net of ``depth`` levels cannot take, and the nearest edges
    that work (both empty when the shape fits)."""
    d = divisor(depth)
    bad = [s for s in shape if s % d or s < d]
    near = sorted({max(d, s // d * d) for s in bad} | {(s // d + 1) * d for s in bad})
    return bad, near


def _check_recompute(config):
    """``lms.recompute: auto`` is decided by auto-tune."""
    if config.lms.recompute == "auto" and not config.lms.autotune:
        raise ConfigError("lms.recompute: auto is decided by auto-tune; set lms.autotune: true "
                          "(with lms.device_memory on a machine without a GPU), or choose none "
                          "or cheap")


def _check_shape(config):
    """``data.shape`` must suit the network (:func:`misfit_edges`)."""
    shape, depth = config.data.shape, config.model.depth
    bad, near = misfit_edges(shape, depth)
    if bad:
        raise ConfigError(
            f"data.shape: {shape} does not fit {config.model.name} with model.depth {depth}: "
            f"every edge must be a multiple of {divisor(depth)}; {', '.join(map(str, bad))} is "
            f"not (nearest that work: {', '.join(map(str, near))})")


DEVICE_NAME = re.compile(r"^/?(?:device:)?(CPU|GPU):(\d+)$", re.IGNORECASE)


def local_device(name: str) -> tuple[str, int] | None:
    """``("GPU", 1)`` for ``/GPU:1`` (also ``GPU:1``, ``/device:GPU:1``); None if ``name`` is not
    a local device name."""
    match = DEVICE_NAME.match(name) if isinstance(name, str) else None
    return (match[1].upper(), int(match[2])) if match else None


def _check_distribute(config):
    """``train.devices`` and the ``lms`` device keys must suit ``train.distribute``."""
    t, lms = config.train, config.lms
    if t.distribute == "none":
        if t.devices is not None:
            raise ConfigError("train.devices: applies only with train.distribute: mirrored "
                              "(set it, or remove train.devices)")
        return
    if t.distribute == "multi_worker" and t.devices is not None:
        raise ConfigError("train.devices: applies only with train.distribute: mirrored; a "
                          "multi_worker run uses every GPU a worker sees (choose them with "
                          "CUDA_VISIBLE_DEVICES), remove train.devices")
    if lms.compute_device is not None:
        raise ConfigError(f"lms.compute_device: must be null with train.distribute: "
                          f"{t.distribute}; each replica computes on its own device from "
                          f"train.devices (got {lms.compute_device!r})")
    if t.devices is None:
        return
    parsed = [local_device(d) for d in t.devices]
    bad = [d for d, p in zip(t.devices, parsed) if p is None]
    if bad or not parsed:
        raise ConfigError(f"train.devices: expected a list of local devices such as [/GPU:0, "
                          f"/GPU:1], got {t.devices!r}")
    if len(set(parsed)) < len(parsed) or len({kind for kind, _ in parsed}) > 1:
        raise ConfigError(f"train.devices: list each device once, all GPUs or all CPUs; got "
                          f"{t.devices!r}")
    host = local_device(lms.host_device) if lms.host_device else None
    if host in parsed:
        raise ConfigError(f"lms.host_device: {lms.host_device} is one of train.devices; swapped "
                          f"tensors need a device no replica computes on (null = the host's "
                          f"memory, /CPU:0 on a GPU machine)")


def _check_run_name(name):
    """``output.name`` names one folder inside ``output.root`` (null = the default)."""
    if name is None:
        return
    if name in ("", ".", "..") or "/" in name or (os.altsep and os.altsep in name) or "\0" in name:
        raise ConfigError(f"output.name: must be a single folder name (no '/', not empty, '.' or "
                          f"'..'), got {name!r}; set output.root to choose where runs go")


def _yaml_problem(err):
    """A YAML error on one line: where (line and column) and what."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(err, "problem", None) or str(err).replace("\n", " ")
    context = getattr(err, "context", None)
    return where + problem + (f" ({context})" if context else "")
