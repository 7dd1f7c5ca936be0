"""Run configuration: dataclasses loaded from YAML files merged in order, plus ``--set a.b=c`` overrides.

A configuration is a tree of dataclasses (:class:`Config` at the root). :func:`load_config` reads one or
more YAML files, merges them in order (later files win, nested mappings are merged key by key, lists and
scalars are replaced), applies ``key.path=value`` overrides, and builds the dataclasses; unknown keys and
duplicate keys raise a ``ValueError`` naming the key and the file. Override values are parsed as YAML and then
checked against the type of the dataclass field they set (``trainer.max_steps=10`` gives an int,
``model.channels=[8,16]`` a list of ints); a mapping value (``trainer={max_steps: 9}``) is merged key by key as a
file's is. A field typed as text keeps the text as written, in files and overrides alike (``out_dir: 0777`` is
the folder ``0777``, not YAML 1.1's octal 511). :func:`save_config` writes the resolved configuration as YAML
beside the results.

A task that needs its own settings puts them in ``task_args`` (a free mapping) or adds a section here.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfast.data.augment import AugmentConfig, check_augment_config
from medfast.ops._validate import py_scalar

__all__ = [
    "AugmentConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "InferenceConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainerConfig",
    "check_config",
    "check_network_input",
    "check_spatial_config",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "merge_dicts",
    "parse_override",
    "save_config",
]


class ConfigError(ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, unreadable file)."""


@dataclass
class DataConfig:
    """Where the subjects come from and how they are preprocessed (on load, once per subject; cached).

    Either ``root`` (a folder with ``images/`` and ``labels/`` holding NIfTI files with matching names), or
    ``train_images`` (+ ``train_labels``) file lists, or ``dataset`` naming a built-in preset
    (``"mni152_tissue"``: the MNI152 T1 with background/CSF/GM/WM classes from its probability maps).
    An entry of ``train_images`` / ``val_images`` / ``test_images`` may be a list of one case's single-channel
    files (nnU-Net's ``case_0000.nii.gz``, ``case_0001.nii.gz``, ...), stacked as its channels.
    """

    dataset: str | None = None
    root: str | None = None
    train_images: list[str | list[str]] = field(default_factory=list)
    train_labels: list[str] = field(default_factory=list)
    val_images: list[str | list[str]] = field(default_factory=list)
    val_labels: list[str] = field(default_factory=list)
    val_fraction: float = 0.0
    test_images: list[str | list[str]] = field(default_factory=list)
    test_labels: list[str] = field(default_factory=list)
    test_label_map: dict[int, int] = field(default_factory=dict)
    reorient: bool = True
    spacing: list[float] | None = None
    shape: list[int] | None = None
    normalize: str = "zscore"
    clip_percentiles: list[float] | None = None
    cache: str = "memory"
    cache_dir: str | None = None
    num_workers: int = 0
    val_deformations: int = 0
    dataset_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """Network: ``name`` picks the builder (``"unet"``); the rest are its arguments."""

    name: str = "unet"
    spatial_dims: int = 3
    in_channels: int = 1
    out_channels: int = 2
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    convs_per_level: int = 2
    norm: str = "instance"
    deep_supervision: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    """Loss weights and options of the task (segmentation: Dice + CE). ``deep_supervision_weights``: one
    non-negative weight per UNet output with ``model.deep_supervision`` (``len(model.channels) - 1`` of them,
    full resolution first; default 1, 1/2, 1/4, ...), divided by their sum."""

    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    include_background: bool = True
    batch_dice: bool = False
    deep_supervision_weights: list[float] | None = None


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (per optimizer step)."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-5
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.01
    grad_clip: float | None = 12.0


@dataclass
class TrainerConfig:
    """The loop: length, batching, devices, precision, checkpoints, logging."""

    out_dir: str = "runs/medfast"
    max_steps: int = 100
    batch_size: int = 2
    accumulate: int = 1
    device: str = "auto"
    amp: str = "auto"
    seed: int = 0
    # true: torch.use_deterministic_algorithms (an op without a deterministic kernel raises; on CUDA the
    # classification nets' adaptive pooling and LocalNet's trilinear upsampling have none); "warn": such ops warn
    deterministic: bool | str = False
    val_every: int = 50
    val_at_start: bool = False
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    progress: bool = True
    tensorboard: bool = True
    plots: bool = True
    resume: str | None = None
    threads: int | None = None
    dist_timeout_min: float = 60.0


@dataclass
class InferenceConfig:
    """Sliding-window inference over volumes larger than the training patch."""

    roi_size: list[int] | None = None
    overlap: float = 0.5
    blend: str = "gaussian"
    sw_batch_size: int = 2
    hd_percentile: float = 95.0


@dataclass
class Config:
    """Root of a run's configuration."""

    task: str = "segmentation"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    task_args: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------
# dict <-> dataclass
# ------------------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` (converting int -> float, str -> number where exact)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if origin in (list, Sequence) or tp is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, f"{where} key"): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp in (bool, int, float, str):
        value = py_scalar(value)  # NumPy scalars and 0-d tensors (values= from Python code): the number they hold
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if value is False and "off" in CHOICES.get(where, ()):  # YAML 1.1 reads a plain off as false
            return "off"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} must be a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def _build(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in hints:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Builds a :class:`Config` from a (possibly partial) nested mapping; missing keys take the defaults."""
    return _build(Config, data or {})


def config_to_dict(config: Any) -> dict[str, Any]:
    """The configuration as plain nested dicts/lists (what :func:`save_config` writes)."""
    return dataclasses.asdict(config)


# ------------------------------------------------------------------------------------------------------
# merging, overrides, files
# ------------------------------------------------------------------------------------------------------


def merge_dicts(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge: mappings are merged key by key, any other value in ``update`` replaces ``base``'s."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


_TEXT_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float", "timestamp")}


@functools.cache
def _yaml_loaders() -> tuple[type, type]:
    """``(Loader, TextLoader)``: PyYAML's SafeLoader refusing duplicate keys, and the same leaving the plain scalars
    that YAML 1.1 would read as bool / int / float / date as their source text (``0777``, ``1.10``, ``2024_01``,
    ``12:30``, ``off``), for the fields typed as text (see :func:`_keep_text`)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            # PyYAML keeps the last of two equal keys silently: a repeated section would drop the first block
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, Any] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # "<<: *anchor" entries may be overridden by explicit keys
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.setdefault(key, key_node)
                    except TypeError:
                        continue  # an unhashable key: SafeConstructor names it
                    if first is not key_node:
                        raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (first at "
                                          f"line {first.start_mark.line + 1}); YAML would keep only the last, "
                                          f"dropping the first: merge the two")
            return super().construct_mapping(node, deep)

    class TextLoader(Loader):
        pass

    TextLoader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in _TEXT_TAGS]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    return Loader, TextLoader


def _load_yaml(text: str) -> tuple[Any, Any]:
    """``text`` read as YAML (duplicate keys refused), and read again with plain scalars kept as text (same shape)."""
    import yaml

    loader, text_loader = _yaml_loaders()
    value = yaml.load(text, Loader=loader)  # noqa: S506 - SafeLoader subclasses
    _check_expanded_size(value)
    return value, yaml.load(text, Loader=text_loader)  # noqa: S506


_MAX_CONFIG_VALUES = 1_000_000


def _check_expanded_size(value: Any) -> None:
    """Refuses a YAML document whose aliases expand to more than a million values ("billion laughs": a 384-byte
    file of nested anchors made copying the configuration take seconds to minutes and gigabytes; one level more,
    the machine's memory). PyYAML shares an aliased node, so loading is cheap; every later copy expands it."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        count += 1
        if count > _MAX_CONFIG_VALUES:
            raise ConfigError(f"the configuration expands to more than {_MAX_CONFIG_VALUES:,} values (nested YAML "
                              "aliases?); a medfast configuration holds a few hundred")
        if isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def _keep_text(value: Any, text: Any, tp: Any) -> Any:
    """``value`` with every position typed as text (``str``, ``str | None``, ``list[str]``, ...) taken from
    ``text``, the same YAML read with plain scalars as written: ``out_dir: 0777`` is '0777' rather than str(511),
    ``cache_dir: 2024_11`` '2024_11' rather than '202411'. Other positions keep YAML's typed value."""
    if tp is Any or value is None:
        return value
    if tp is str:
        return text if isinstance(text, str) else value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if isinstance(value, bool) and bool in options:  # (bool | str: trainer.deterministic true / false / warn)
            return value
        for arg in options:
            kind = typing.get_origin(arg) or arg
            if isinstance(value, list) and kind in (list, Sequence):
                return _keep_text(value, text, arg)
            if isinstance(value, Mapping) and (kind is dict or dataclasses.is_dataclass(arg)):
                return _keep_text(value, text, arg)
        scalar = not isinstance(value, (list, Mapping))
        return _keep_text(value, text, str) if scalar and str in options else value
    if origin in (list, Sequence) or tp is list:
        if isinstance(value, list) and isinstance(text, list) and len(value) == len(text):
            item = args[0] if args else Any
            return [_keep_text(v, t, item) for v, t in zip(value, text)]
        return value
    is_dc = dataclasses.is_dataclass(tp)
    if (is_dc or origin is dict) and isinstance(value, Mapping) and isinstance(text, Mapping) \
            and len(value) == len(text):
        hints = _hints(tp) if is_dc else None
        kt, vt = (args if args else (Any, Any)) if not is_dc else (Any, Any)
        out = {}
        for (k, v), (tk, t) in zip(value.items(), text.items()):
            key = tk if kt is str and isinstance(tk, str) else k
            out[key] = _keep_text(v, t, hints.get(k, Any) if hints is not None else vt)
        return out
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=c"`` -> ``(["a", "b"], value)`` with ``value`` parsed as YAML (``"null"`` gives None). (A field typed
    as text takes the text as written instead: see :func:`load_config`.)"""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} must have the form key.path=value (e.g. trainer.max_steps=10)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = _load_yaml(raw)[0] if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except ConfigError as exc:  # a duplicate key in a mapping value
        raise ConfigError(f"override {text!r}: {exc}") from None
    return key.split("."), value


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The settings ``overrides`` (``--set key=value``) set, each once, named ``section.key`` (``data.dataset_args``
    and ``task_args``-like free mappings of a section: ``section.mapping.key``); a mapping value sets its keys
    (``inference={overlap: 0.25}`` sets ``inference.overlap``)."""

    def flat(path: list[str], value: Any) -> list[str]:
        depth = 3 if path[:2] == ["data", "dataset_args"] else 2
        if len(path) < depth and isinstance(value, Mapping) and value:
            return [k for name, v in value.items() for k in flat([*path, str(name)], v)]
        return [".".join(path[:depth])]

    return list(dict.fromkeys(k for text in overrides for k in flat(*parse_override(text))))


def _override_value(raw: str, value: Any, tp: Any) -> Any:
    """The value of an override ``key=raw`` for a field of type ``tp``: for text, the text as written (``0777``,
    ``1.10``, ``12:30`` and ``runs/a #1`` stay as they are; null still gives None and a quoted string loses its
    quotes), elsewhere YAML's value with text positions (``list[str]`` items, a section's text fields) as written."""
    import yaml

    if value is None or not raw.strip():
        return value
    try:
        node = yaml.compose(raw, Loader=_yaml_loaders()[0])
        texts = _load_yaml(raw)[1]
    except (yaml.YAMLError, ConfigError):
        return value
    if isinstance(node, yaml.ScalarNode) and node.style is None and not isinstance(value, (list, Mapping)):
        text_typed = tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                                   and str in typing.get_args(tp))
        if text_typed and not (isinstance(value, bool) and bool in typing.get_args(tp)):  # (bool | str: true stays)
            return raw.strip()
    return _keep_text(value, texts, tp)


def _set_path(tree: dict[str, Any], path: list[str], value: Any, text: str, raw: str | None = None) -> None:
    """Sets ``tree[path[0]][path[1]]... = value`` (``raw``: the override's text, for fields typed as text); a
    mapping is merged into the mapping already there, key by key, as a later file's would be."""
    node = tree
    cls: Any = Config
    for i, part in enumerate(path):
        hints = _hints(cls) if dataclasses.is_dataclass(cls) else None
        if hints is not None and part not in hints:
            where = ".".join(path[:i]) or "the top level"
            valid = ", ".join(f.name for f in dataclasses.fields(cls))
            raise ConfigError(f"override {text!r}: unknown key {part!r} in {where}; valid keys: {valid}")
        tp = hints[part] if hints is not None else Any
        if i == len(path) - 1:
            if raw is not None:
                value = _override_value(raw, value, tp)
            if isinstance(value, Mapping) and isinstance(node.get(part), Mapping):
                value = merge_dicts(node[part], value)
            _coerce(value, tp, ".".join(path))  # type check now, to name the override on failure
            node[part] = value
            return
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
        cls = tp if dataclasses.is_dataclass(tp) else None


def load_config(
    paths: str | Path | Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
    values: Mapping[str, Any] | None = None,
) -> Config:
    """Reads YAML files merged in order, applies ``key.path=value`` overrides, returns the :class:`Config`.

    Relative paths in the configuration (``data.root``, ``trainer.out_dir``, ...) are used as given, i.e. read
    from the current working directory, not from the config file's folder; a leading ``~`` is the home folder
    (in ``data.root``, ``data.cache_dir``, the file lists, ``trainer.out_dir`` and ``trainer.resume``).

    Parameters
    ----------
    paths : path or sequence of paths
        YAML files, merged in order (later files override earlier ones). A field typed as text keeps a plain
        scalar as written (``out_dir: 0777`` is the folder ``0777``); a duplicate key is an error.
    overrides : sequence of str
        ``"section.key=value"`` strings (values parsed as YAML, typed by the dataclass field; a text field takes
        the value as written; a mapping merges into the section key by key), applied last.
    base : mapping, optional
        Values applied before the first file.
    values : mapping, optional
        ``{"section.key": value}`` set last, verbatim (not parsed as YAML; still type-checked): the command
        line's ``--out``, ``--resume`` and ``--device``, so that e.g. ``--out "runs/a #1"`` or ``--out 0777``
        is the folder of that name.

    Raises
    ------
    ConfigError
        A missing or invalid YAML file, an unknown or duplicate key (named with its file), or a value of the
        wrong type.
    """
    import yaml

    if isinstance(paths, (str, Path)):
        paths = [paths]
    tree: dict[str, Any] = dict(base or {})
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not a UTF-8 text (YAML) file; is it a data file?") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        try:
            data, texts = _load_yaml(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        except ConfigError as exc:  # a duplicate key
            raise ConfigError(f"config file {path}: {exc}") from None
        data = data or {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
        data = _keep_text(data, texts, Config)
        try:
            config_from_dict(data)  # validate each file on its own, to name the file holding a bad key
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        tree = merge_dicts(tree, data)
    for text in overrides:
        path_parts, value = parse_override(text)
        _set_path(tree, path_parts, value, text, raw=text.split("=", 1)[1])
    for key, value in (values or {}).items():
        _set_path(tree, key.split("."), value, f"{key}={value}")
    return _expand_home(config_from_dict(tree))


def _expand_home(config: Config) -> Config:
    """``~`` / ``~user`` at the start of a path setting is the home folder, as a shell expands it: no shell
    expands it in a config file, a ``--set`` or ``--out=~/x``, and a folder literally named ``~`` was made."""
    def home(p: Any) -> Any:
        return os.path.expanduser(p) if isinstance(p, str) else p

    d, t = config.data, config.trainer
    d.root, d.cache_dir, t.out_dir, t.resume = home(d.root), home(d.cache_dir), home(t.out_dir), home(t.resume)
    for name in ("train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels"):
        setattr(d, name, [[home(q) for q in p] if isinstance(p, list) else home(p) for p in getattr(d, name)])
    return config


def save_config(config: Config, path: str | Path) -> Path:
    """Writes the resolved configuration as YAML (atomically) and returns the path."""
    import yaml

    from medfast._atomic import replacing

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    with replacing(path) as tmp:
        tmp.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------------
# checks of values (before any data is read)
# ------------------------------------------------------------------------------------------------------

#: Settings with a fixed set of values, checked by :func:`check_config` (compared in lower case where the
#: code that uses them does).
CHOICES: dict[str, tuple[str, ...]] = {
    "optim.name": ("adamw", "adam", "sgd"),
    "optim.scheduler": ("cosine", "constant", "poly"),
    "trainer.amp": ("auto", "bf16", "fp16", "none", "off", "fp32"),
    "data.normalize": ("zscore", "minmax", "none"),
    "data.cache": ("memory", "disk", "none"),
    "inference.blend": ("gaussian", "constant"),
}
_LOWER = {"optim.name", "optim.scheduler", "trainer.amp"}


def check_choice_setting(key: str, value: Any) -> Any:
    """``value`` of the setting ``key`` of :data:`CHOICES` (lower-cased where the code compares it so); raises
    :class:`ConfigError` naming the key and its allowed values."""
    text = value.lower() if key in _LOWER and isinstance(value, str) else value
    if text not in CHOICES[key]:
        raise ConfigError(f"{key} must be one of {', '.join(CHOICES[key])}; got {value!r}")
    return text


def _value(config: Config, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def unused_settings(config: Config, read: Mapping[str, set[str]], harmless: Mapping[str, Any] | None = None
                    ) -> list[str]:
    """``section.key`` of every setting of the sections named in ``read`` (``data``, ``model``, ``loss``,
    ``augment``, ``inference``) that differs from its default although the task does not read it
    (``read[section]``), except the values in ``harmless`` (``{"section.key": value}``: they state what the task
    does anyway). A task refuses these rather than ignore them silently."""
    harmless = harmless or {}
    unused = []
    for section, keys in read.items():
        value = getattr(config, section)
        default = type(value)()
        for f in dataclasses.fields(value):
            key, v = f"{section}.{f.name}", getattr(value, f.name)
            if f.name in keys or v == getattr(default, f.name):
                continue
            if key in harmless and v == harmless[key] and type(v) is type(harmless[key]):
                continue
            unused.append(key)
    return unused


def check_config(config: Config) -> None:
    """Checks the settings every task shares (the trainer's, the optimizer's, the data loader's) and raises a
    :class:`ConfigError` naming the key and its allowed values; run before any data is read.

    Task-specific settings (``model.*``, ``task_args``, ``data.dataset_args``) are checked by the task;
    :func:`check_spatial_config` checks the spatial settings of the image tasks.
    """
    for key in CHOICES:
        check_choice_setting(key, _value(config, key))
    tc = config.trainer
    if isinstance(tc.deterministic, str) and tc.deterministic != "warn":
        raise ConfigError(f"trainer.deterministic must be true, false or warn; got {tc.deterministic!r}")
    for key in ("max_steps", "batch_size", "accumulate", "log_every"):
        if getattr(tc, key) < 1:
            raise ConfigError(f"trainer.{key} must be >= 1, got {getattr(tc, key)}")
    for key in ("val_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(tc, key) < 0:
            raise ConfigError(f"trainer.{key} must be >= 0 (0: never / keep all), got {getattr(tc, key)}")
    if not 0 < tc.dist_timeout_min < math.inf:
        raise ConfigError(f"trainer.dist_timeout_min must be > 0 (minutes), got {tc.dist_timeout_min}")
    if tc.threads is not None and tc.threads < 1:
        raise ConfigError(f"trainer.threads must be >= 1 (or null), got {tc.threads}")
    # the seed feeds NumPy's default_rng (the validation split: >= 0) and torch generators seeded with
    # seed * 1_000_003 + epoch (the data order: must fit 64 bits)
    if not 0 <= tc.seed < 2**32:
        raise ConfigError(f"trainer.seed must lie in [0, 2**32), got {tc.seed}")
    if not tc.out_dir:
        raise ConfigError("trainer.out_dir (--out) must not be empty")
    if tc.val_at_start and not tc.val_every:  # (the trainer validates at step 0 only when validation is on)
        raise ConfigError("trainer.val_at_start: true validates the untrained model as step 0 of the validation, "
                          "but trainer.val_every: 0 turns validation off (no validation row would be written): set "
                          "trainer.val_every > 0, or remove trainer.val_at_start")
    d = config.data
    if d.cache == "disk" and not d.cache_dir:
        raise ConfigError("data.cache='disk' needs data.cache_dir (the folder for the cached subjects)")
    # (only the tasks that read the setting: the others refuse it themselves, "does not use data.X: remove it",
    # where these hints would send the user to a setting the task refuses next)
    if d.cache_dir and d.cache != "disk" and config.task in ("segmentation", "registration"):
        raise ConfigError(f"data.cache_dir is the folder of data.cache: disk, but data.cache is {d.cache!r} (it "
                          f"would be ignored): set data.cache: disk, or remove data.cache_dir")
    # a built-in data set (data.dataset) fills data.test_images later: the segmentation task checks that case
    if d.test_label_map and not d.test_images and d.dataset is None and config.task == "segmentation":
        raise ConfigError("data.test_label_map relabels the test set's labels, but data.test_images is empty (it "
                          "would be ignored): give data.test_images / test_labels, or remove data.test_label_map")
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must lie in [0, 1), got {d.val_fraction}")
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {d.num_workers}")
    if d.clip_percentiles is not None and (len(d.clip_percentiles) != 2
                                           or not 0 <= d.clip_percentiles[0] < d.clip_percentiles[1] <= 100):
        raise ConfigError(f"data.clip_percentiles must be two percentiles 0 <= lo < hi <= 100, got "
                          f"{d.clip_percentiles}")
    o = config.optim
    # (NaN fails every comparison below, so each check also refuses it)
    if not 0 < o.lr < math.inf:
        raise ConfigError(f"optim.lr must be > 0 and finite, got {o.lr}")
    if not 0 <= o.weight_decay < math.inf:
        raise ConfigError(f"optim.weight_decay must be >= 0 and finite, got {o.weight_decay}")
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"optim.momentum must lie in [0, 1), got {o.momentum}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    if not 0 <= o.min_lr_ratio <= 1:  # the schedule's floor, lr * min_lr_ratio: < 0 would be gradient ascent
        raise ConfigError(f"optim.min_lr_ratio must lie in [0, 1], got {o.min_lr_ratio}")
    if o.grad_clip is not None and not 0 <= o.grad_clip < math.inf:
        raise ConfigError(f"optim.grad_clip must be >= 0 and finite (0 or null: no clipping), got {o.grad_clip}")
    _check_augment(config.augment)
    inf = config.inference
    if not 0 <= inf.overlap < 1:
        raise ConfigError(f"inference.overlap must lie in [0, 1), got {inf.overlap}")
    # these are read only at the first validation: checked now, not after val_every steps of training
    if inf.sw_batch_size < 1:
        raise ConfigError(f"inference.sw_batch_size must be >= 1, got {inf.sw_batch_size}")
    if not 0 <= inf.hd_percentile <= 100:
        raise ConfigError(f"inference.hd_percentile must lie in [0, 100], got {inf.hd_percentile}")
    for key in ("lambda_dice", "lambda_ce"):
        if not 0 <= getattr(config.loss, key) < math.inf:
            raise ConfigError(f"loss.{key} must be >= 0 and finite, got {getattr(config.loss, key)}")


def _check_augment(a: AugmentConfig) -> None:
    """The augmentation ranges (read at the first training step: checked before any data is read)."""
    check_augment_config(a, ConfigError)


def check_spatial_config(config: Config, *, dims: Sequence[int] = (2, 3), in_channels: bool = True) -> None:
    """Checks ``model.spatial_dims`` (one of ``dims``) and that ``augment.patch_size``, ``inference.roi_size``,
    ``data.spacing`` and ``data.shape`` give one positive entry per spatial axis; raises :class:`ConfigError`."""
    m = config.model
    nd = m.spatial_dims
    if nd not in dims:
        raise ConfigError(f"model.spatial_dims must be {' or '.join(map(str, dims))} for the {config.task} task, "
                          f"got {nd}")
    if in_channels and m.in_channels < 1:
        raise ConfigError(f"model.in_channels must be >= 1, got {m.in_channels}")
    flip = list(config.augment.flip or [])
    if any(isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < nd for a in flip):
        raise ConfigError(f"augment.flip must list spatial axes in [0, {nd}) of a model.spatial_dims={nd} model, "
                          f"got {flip}")
    for key in ("augment.patch_size", "inference.roi_size", "data.spacing", "data.shape"):
        value = _value(config, key)
        if value is None:
            continue
        if len(value) != nd or not all(v > 0 for v in value):
            raise ConfigError(f"{key} must have {nd} positive entries (one per axis of a model.spatial_dims={nd} "
                              f"model), got {list(value)}")
    if config.task == "segmentation" and str(m.name).lower() == "unet" and m.norm in ("instance", "batch"):
        # the U-Net's training input (the patch, else data.shape) and its sliding window, before step 1; batch
        # norm fails alike in training on one sample per process (its sliding window runs in eval mode)
        downsamplings = max(len(m.channels) - 1, 0)
        train_key = "augment.patch_size" if config.augment.patch_size is not None else "data.shape"
        keys = (train_key, "inference.roi_size") if m.norm == "instance" else (
            (train_key,) if config.trainer.batch_size == 1 else ())
        for key in keys:
            if _value(config, key) is not None:
                check_network_input(config, key, _value(config, key), downsamplings)


def check_network_input(config: Config, key: str, shape: Sequence[int], downsamplings: int) -> None:
    """The network input ``shape`` (the setting ``key``) halved ``downsamplings`` times (rounding up: ceil-mode
    pooling, or a U-Net's padding to a multiple of ``2 ** downsamplings``) must keep more than one voxel at the
    deepest level, where instance normalization would otherwise fail at the first step; raises
    :class:`ConfigError` naming ``key`` and ``model.channels`` (whose length sets the depth)."""
    def deepest(d: int) -> list[int]:
        return [-(-int(s) // 2**d) for s in shape]

    if math.prod(deepest(downsamplings)) > 1:
        return
    fits = max((d for d in range(1, downsamplings) if math.prod(deepest(d)) > 1), default=None)
    fix = f"give a larger {key}" + ("" if fits is None else f" or at most {fits + 1} model.channels entries")
    norm = ("batch normalization of one sample (trainer.batch_size 1)" if config.model.norm == "batch"
            else "instance normalization")
    raise ConfigError(f"{key} = {list(shape)} is too small for model.channels = {list(config.model.channels)} "
                      f"({downsamplings} down-sampling levels): the deepest level would be {deepest(downsamplings)}, "
                      f"one voxel, and {norm} needs more than one; {fix}")
