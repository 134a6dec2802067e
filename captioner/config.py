"""Hydra configuration in one place: the `run_id` resolver, the schemas of the groups users edit,
the value checks, and `hydra_main`, which every Hydra entry point runs through.

Schemas are dataclasses in Hydra's ConfigStore under `schema/`; the YAML files start from them
(`defaults: [/schema/data@_here_, ...]`), so a wrong type or an unknown key fails at composition.
Each schema is read from the signature of what the group instantiates (`CaptionDataModule`, the
mappers, `lightning.Trainer`, `Decoding`; the model group stays open, because its second stages,
SCST and retrieval, add arguments of their own and `model.*` values are checked by `check` and the
module itself): a new constructor argument is a new
config key, with its default, and never a second list to keep in step. Values a type cannot say
(a positive batch size, one of a few names) are checked in `check` before anything runs. Either way
the user sees one line naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import linecache
import os
import re
import secrets
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, InstantiationException, MissingConfigException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, InterpolationKeyError, MissingMandatoryValue,
                              OmegaConfBaseException)

from captioner.data.datamodule import CaptionDataModule
from captioner.data.mirror import SideWords
from captioner.data.noise import add_noise
from captioner.data.synthetic import write_dataset
from captioner.generate import Decoding
from captioner.models.registry import DIMENSIONS, MAPPERS
from captioner.module import CaptionModule

# run directories are named `<time>_${run_id:}`: a random suffix keeps two runs started in the same
# second apart (conf/hydra/default.yaml)
OmegaConf.register_new_resolver("run_id", lambda: secrets.token_hex(3), use_cache=True, replace=True)
# the directory a command was started in (paths.root_dir). Unlike ${hydra:runtime.cwd} it resolves before any
# job exists, as a multirun's sweep directory must; jobs in other processes (a launcher's workers) read the
# same directory from the environment, set at launch
# DataLoader workers: `${cpus:4}` is 4, or fewer on a machine with fewer CPUs for this process (more
# workers than CPUs only slow each other down, and torch warns about it)
OmegaConf.register_new_resolver("cpus", lambda most: min(int(most), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1), replace=True)
LAUNCH_DIR = "CAPTIONER_LAUNCH_DIR"
OmegaConf.register_new_resolver("launch_dir", lambda: os.environ.get(LAUNCH_DIR) or os.getcwd(), replace=True)

# an installed package carries the configs as captioner/conf; a checkout has them beside the package
CONF_DIR = str(next(d for d in (Path(__file__).resolve().parent / "conf", Path(__file__).resolve().parents[1] / "conf")
                    if d.is_dir()))
PACKAGE_DIR = Path(__file__).resolve().parent
PLAIN = (int, float, bool, str)


def _key_type(annotation):
    """The OmegaConf type of a parameter: int/float/bool/str (optional or not), else Any."""
    if annotation in PLAIN:
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and args[0] in PLAIN and len(typing.get_args(annotation)) == 2:
            return Optional[args[0]]
    return Any


def schema_of(fn: Callable, name: str, skip: tuple[str, ...] = (), first: tuple = (), nested: dict | None = None) -> type:
    """A dataclass with one field per parameter of `fn` (its type and default); `first` fields
    (name, type, default) come before them, `nested` maps a parameter to a schema of its own."""
    hints = typing.get_type_hints(fn)  # a dataclass gives its fields' types
    fields = [(n, t, dataclasses.field(default=d)) for n, t, d in first]
    for p in inspect.signature(fn).parameters.values():
        if p.name in ("self", *skip) or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        kind = Optional[nested[p.name]] if nested and p.name in nested else _key_type(hints.get(p.name, Any))
        if p.default is p.empty:
            default = dataclasses.field(default=MISSING)
        elif isinstance(p.default, (list, dict, tuple)):
            default = dataclasses.field(default_factory=lambda v=p.default: type(v)(v))
        else:
            default = dataclasses.field(default=p.default)
        fields.append((p.name, kind, default))
    schema = dataclasses.make_dataclass(name, fields)
    schema.__module__ = __name__
    return schema


INSTANTIATED = (("_target_", str, MISSING), ("_convert_", str, MISSING))  # the YAML says what is built, and how


NoiseSchema = schema_of(add_noise, "NoiseSchema", skip=("features", "generator"))
SyntheticSchema = schema_of(write_dataset, "SyntheticSchema")
DataSchema = schema_of(CaptionDataModule.__init__, "DataSchema", first=INSTANTIATED,
                       nested={"noise": NoiseSchema, "synthetic": SyntheticSchema})
MapperSchemas = {  # every registered mapper; its dimensions come from the encoder and decoder, never the config
    name: schema_of(cls.__init__, f"{cls.__name__}Schema", skip=DIMENSIONS, first=(("name", str, name),))
    for name, cls in MAPPERS.items()
}
DecodingSchema = schema_of(Decoding, "DecodingSchema")  # Decoding itself is frozen: overrides need a mutable node
TrainerSchema = schema_of(L.Trainer.__init__, "TrainerSchema", first=INSTANTIATED[:1])


def register() -> None:
    store = ConfigStore.instance()
    store.store(group="schema", name="data", node=DataSchema)
    store.store(group="schema", name="trainer", node=TrainerSchema)
    store.store(group="schema", name="decoding", node=DecodingSchema)
    for name, node in MapperSchemas.items():
        store.store(group="schema/mapper", name=name, node=node)


register()


def _positive(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _non_negative(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _one_of(*choices) -> tuple[Callable, str]:
    return (lambda v: v in choices), "one of " + ", ".join(map(str, choices))


POSITIVE, NON_NEGATIVE = (_positive, "a positive integer"), (_non_negative, "an integer >= 0")
PRECISIONS = _one_of("fp32", "fp16", "bf16")


def _swaps_back(swap) -> bool:
    """A mirror's word swap (data/mirror.py): words, each one's swap mapping back to it."""
    try:
        SideWords(OmegaConf.to_container(swap) if OmegaConf.is_config(swap) else swap)
    except (ValueError, AttributeError, TypeError):
        return False
    return True


# key -> (test, what is allowed): values whose type alone does not rule them out
CHECKS: dict[str, tuple[Callable, str]] = {
    "data.batch_size": POSITIVE,
    "data.eval_batch_size": POSITIVE,
    "data.extract_batch_size": POSITIVE,
    "data.num_workers": NON_NEGATIVE,
    "data.max_tokens": ((lambda v: _positive(v) and v >= 2), "an integer >= 2 (a token and end-of-text)"),
    "data.length_buckets": NON_NEGATIVE,
    "data.feature_dtype": _one_of("fp16", "fp32"),
    "data.precision": PRECISIONS,
    "data.bad_images": _one_of("stop", "skip"),
    "score_weights": _one_of("best", "last"),
    "data.noise.variance": ((lambda v: v >= 0), "a variance >= 0 (0 turns the noise off)"),
    "data.noise.rate": ((lambda v: 0 <= v <= 1), "a share in [0, 1]"),
    "data.mirror_swap": (_swaps_back, "word pairs that map back, e.g. {left: right, right: left}"),
    "model.prefix_length": POSITIVE,
    "model.encoder_precision": PRECISIONS,
    "model.lr": ((lambda v: v > 0), "a learning rate > 0"),
    "model.decoder_lr": ((lambda v: v > 0), "a learning rate > 0, or null for model.lr"),
    "model.warmup_steps": NON_NEGATIVE,
    "model.val_cider_images": NON_NEGATIVE,
    "model.mapper.num_layers": POSITIVE,
    "model.mapper.num_heads": POSITIVE,
    "trainer.max_epochs": ((lambda v: v is None or isinstance(v, int) and v >= -1), "an integer >= -1 (-1: no limit) or null"),
}
DECODING_KEYS = ("test_decoding", "decoding", "model.val_decoding")
for _key in DECODING_KEYS:
    CHECKS[f"{_key}.strategy"] = _one_of("greedy", "beam", "sample")
    CHECKS[f"{_key}.engine"] = _one_of("cached", "hf")


class ConfigError(ValueError):
    """A config value that is not allowed: the message names the key and what is allowed."""


def check(cfg: DictConfig) -> None:
    """The value checks of CHECKS and the decoding options, on the composed config, before any work."""
    check_references(cfg)
    for key, (test, allowed) in CHECKS.items():
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if value is None and key != "trainer.max_epochs" or OmegaConf.select(cfg, key.rsplit(".", 1)[0]) is None:
            continue
        if not test(value):
            raise ConfigError(f"{key}={value!r} is not allowed: use {allowed}")
    for key in DECODING_KEYS:
        options = OmegaConf.select(cfg, key, default=None)
        if options is None:
            continue
        options = OmegaConf.to_container(options, resolve=True)
        unknown = set(options) - {f.name for f in dataclasses.fields(Decoding)}
        if unknown:
            raise ConfigError(f"{key}.{sorted(unknown)[0]} is not a decoding option: use {', '.join(f.name for f in dataclasses.fields(Decoding))}")
        try:
            Decoding(**options)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None


def check_references(cfg: DictConfig) -> None:
    """Every `${key}` in the config has a key to read. A config group removed on the command line
    (`pretrain=null`) leaves the keys that read it unresolved: model=tiny's `model.encoder` reads
    `${pretrain.clip.out}`. That is one line naming the keys to set, before any work."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationKeyError as error:
        wanted = re.search(r"'([^']+)'", str(error))  # "Interpolation key 'pretrain.clip.out' not found"
        wanted = wanted[1] if wanted else "?"
        group = wanted.split(".")[0]
        if not ((Path(CONF_DIR) / group).is_dir() and group_removed(group)):
            raise ConfigError(f"{error.full_key} reads ${{{wanted}}}, which this config does not have: set one of them") from None
        readers = [key for key, value in leaves(OmegaConf.to_container(cfg, resolve=False))
                   if isinstance(value, str) and re.search(rf"\$\{{{re.escape(group)}[.}}]", value)]
        raise ConfigError(f"{group}=null removed the {group} config group, which {', '.join(readers)} read: set "
                          f"{'them' if len(readers) > 1 else 'it'} yourself ({readers[0]}=...), or keep {group}") from None


def leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a plain container."""
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in leaves(v, f"{prefix}{k}.")]
    if isinstance(node, list):
        return [leaf for i, v in enumerate(node) for leaf in leaves(v, f"{prefix}{i}.")]
    return [(prefix[:-1], node)]


def group_removed(group: str) -> bool:
    """Whether this run's config has no option of `group` (Hydra's choices: `~group` or `group=null` removed it)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and HydraConfig.get().runtime.choices.get(group) is None


def check_machine(cfg: DictConfig) -> None:
    """What the config asks of this machine, before any work: a GPU trainer needs a GPU. Separate from
    `check`, which judges the values alone (a GPU experiment's config is right on any machine)."""
    accelerator = OmegaConf.select(cfg, "trainer.accelerator", default=None, throw_on_missing=False)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator} needs a GPU and this machine has none: run it on a GPU "
                          f"machine, or add trainer=cpu")


def one_line(error: BaseException) -> str:
    """A composition or config error as the one line a user needs: the key and what is allowed."""
    if isinstance(error, MissingConfigException) and error.options:
        group = error.missing_cfg_file.rsplit("/", 1)[0]
        wanted = error.missing_cfg_file.rsplit("/", 1)[-1]
        return f"{group}={wanted} is not an option: choose one of {', '.join(sorted(error.options))}"
    if isinstance(error, OmegaConfBaseException) or isinstance(error.__cause__, OmegaConfBaseException):
        inner = error if isinstance(error, OmegaConfBaseException) else error.__cause__
        key = getattr(inner, "full_key", None)
        if isinstance(inner, MissingMandatoryValue) and key:
            return f"{key} is required: add {key}=..."
        if isinstance(inner, (ConfigKeyError, ConfigAttributeError)) and key and getattr(inner, "parent_node", None) is not None:
            allowed = ", ".join(k for k in inner.parent_node.keys() if not str(k).startswith("_"))
            return f"{key} is not a config key here: the keys are {allowed}"
        message = str(inner).split("\n")[0].strip()
        return f"{key}: {message}" if key else message
    return " ".join(str(error).split("\n")[0].split())


# a shard pattern such as s3://bucket/{00000..00999}.tar: a shell strips the quotes users put around it,
# and Hydra's override grammar reads an unquoted `{` as the start of a dict
BRACE_RANGE = re.compile(r"^([\w.@/+~-]+)=([^'\"].*\{\d+\.\.\d+\}.*)$")
GROUP_NULL = re.compile(r"([A-Za-z_][\w/]*)=null")


def null_groups(argv: list[str]) -> list[str]:
    """`group=null` -> `~group`: on the command line a config group (`pretrain`, `logger`, `model/mapper`) set
    to null is removed, as `group: null` is in a defaults list; Hydra itself spells that `~group` and takes
    `group=null` for a string it cannot read. Keys that are not groups (`ckpt_path=null`) stay as typed."""
    return [f"~{m[1]}" if (m := GROUP_NULL.fullmatch(a)) and (Path(CONF_DIR) / m[1]).is_dir() else a for a in argv]


def quote_brace_ranges(argv: list[str]) -> list[str]:
    """`key=a/{0..9}.tar` -> `key='a/{0..9}.tar'`: a brace range is never a Hydra dict, so the override
    means the string, as it does typed with the quotes a shell removes."""
    return [f"{m[1]}='{m[2]}'" if (m := BRACE_RANGE.match(a)) and "'" not in m[2] else a for a in argv]


def reported(error: BaseException) -> bool:
    """Whether `error` comes from a `raise` statement in captioner's own code: a ValueError captioner raises
    names a setting or an input it refuses, while one raised anywhere else (a library, `int("x")`, a failed
    unpacking) is a bug, whose traceback the user and the report need."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    if not Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR):  # `python -m` runs as __main__
        return False
    return linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).lstrip().startswith("raise ")


def usage(config_name: str) -> str:
    """The commands a config file opens with (its leading comment lines), which `--help` prints above
    Hydra's list of config groups and options."""
    lines = []
    for line in (Path(CONF_DIR) / f"{config_name}.yaml").read_text().splitlines():
        if not line.startswith("#") or line.startswith("# @package"):
            break
        lines.append(line[1:].removeprefix(" "))
    return "\n".join(["usage (Hydra overrides key=value, group=option; -m sweeps; --cfg job prints the config):", *lines, ""])


def hydra_main(config_name: str) -> Callable:
    """`hydra.main` for captioner's entry points. Bad input exits with status 2 and one line on
    stderr, no traceback: an unknown option or key, a wrong type (at composition), a value `check`
    refuses, and the errors captioner raises about what it was given (a missing file, a stale cache,
    absent weights, a ValueError naming a setting). Any other error is a bug and keeps its traceback;
    `HYDRA_FULL_ERROR=1` shows the traceback of every error."""
    import hydra

    from captioner.callbacks import NonFiniteError
    from captioner.data.disk import DiskFullError
    from captioner.data.extraction import BadImagesError
    from captioner.data.manifest import CompleteStoreError, StaleStoreError
    from captioner.models.hub import MissingWeightsError

    user_errors = (ConfigError, FileNotFoundError, StaleStoreError, CompleteStoreError, MissingWeightsError,
                   DiskFullError, NonFiniteError, MissingMandatoryValue, BadImagesError)
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"

    def decorate(task: Callable) -> Callable:
        @functools.wraps(task)
        def checked(cfg: DictConfig):
            if not full:  # composed: from here on, errors are the task's (Hydra reports them as usual)
                os.environ.pop("HYDRA_FULL_ERROR", None)
            try:
                check(cfg)
                check_machine(cfg)
                return task(cfg)
            except Exception as error:
                # `instantiate` wraps what a constructor raised (absent weights, a missing file): report that
                cause = error.__cause__ if isinstance(error, InstantiationException) else error
                if full or not (isinstance(cause, user_errors) or (isinstance(cause, ValueError) and reported(cause))):
                    raise
                # the whole message: some run over lines (a list of unreadable images, then what to do).
                # Exiting also ends a multirun at its first job: the next jobs would fail the same way
                print(f"error: {one_line(cause) if isinstance(cause, OmegaConfBaseException) else str(cause).strip()}",
                      file=sys.stderr)
                sys.exit(2)

        @functools.wraps(task)
        def main():
            os.environ.setdefault(LAUNCH_DIR, os.getcwd())
            if ({"-m", "--multirun"} & set(sys.argv[1:]) or any("optuna" in a for a in sys.argv[1:])) \
                    and importlib.util.find_spec("optuna") is not None:
                # any sweep may use the Optuna sweeper (a sweep file can name it): its study notices (INFO)
                # would stand beside a one-line error, and the sweeper's own log says each trial and the best
                import optuna

                optuna.logging.set_verbosity(optuna.logging.WARNING)
            sys.argv[1:] = null_groups(quote_brace_ranges(sys.argv[1:]))
            if {"--help", "-h"} & set(sys.argv[1:]):
                print(usage(config_name))
            run = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)(checked)
            if full:
                return run()
            os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises composition errors, to the handler below
            try:
                return run()
            except (HydraException, OmegaConfBaseException) as error:
                print(f"error: {one_line(error)}", file=sys.stderr)
                sys.exit(2)
            finally:
                os.environ.pop("HYDRA_FULL_ERROR", None)

        return main

    return decorate
