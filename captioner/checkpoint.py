"""Loading a trained model without running anyone's code: Lightning `.ckpt` files or export directories.

A `.ckpt` is read only with `torch.load(weights_only=True)`, which unpickles tensors and plain
containers and refuses any other global; an export directory (captioner/export.py) holds
`model.safetensors` + `config.json` + the tokenizer files, and safetensors holds no code at all.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from hydra.experimental.callback import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig

from captioner.models.decoder import write_tokenizer
from captioner.models.encoder import clip_name, renamed
from captioner.module import CaptionModule
from captioner.scratch import private_dir

WEIGHTS, CONFIG = "model.safetensors", "config.json"


class UnsafeCheckpointError(ValueError):
    """The checkpoint's pickle names globals (functions, classes) that would run on load, or the checkpoint
    names a file that would (a TorchScript encoder)."""


def refuse_named_code(hparams: Mapping, overrides: Mapping, source) -> None:
    """A checkpoint or export may name an encoder file; one that is TorchScript would be loaded with
    `torch.jit.load`, which runs the code it holds. Only a file the user names (`encoder=` override)
    is loaded that way; published CLIP names are fetched and checked by `clip` itself."""
    from captioner.models.encoder import _is_torchscript

    spec = clip_name(hparams.get("encoder"))
    if "encoder" in overrides or spec is None:
        return
    path = Path(spec).expanduser()
    if path.is_file() and _is_torchscript(path):
        raise UnsafeCheckpointError(
            f"{source} names the encoder {path}, a TorchScript file, which runs code when loaded: refusing to load it "
            f"on the checkpoint's word. If you trust that file, name it yourself: encoder={path} (evaluate, serve), "
            f"--encoder {path} (caption) or Captioner.from_pretrained(..., encoder='{path}')"
        )


class _Vocabulary:
    """What load_decoder reads of a tokenizer, for a build on the meta device: a size and an end-of-text id."""

    def __init__(self, size: int):
        self.size, self.eos_token_id = size, size - 1

    def __len__(self) -> int:
        return self.size


LAYERS = {  # spec key -> (config fields, the weights' layer index pattern) for GPT-2 and the AutoConfig families
    "decoder": (("n_layer", "num_hidden_layers"), r"decoder\..*?\b(?:h|layers)\.(\d+)\."),
    "encoder": (("vision_layers", "transformer_layers"), r"encoder\.(visual|text)\.transformer\.resblocks\.(\d+)\."),
}


def check_sizes(hparams: Mapping, shapes: Mapping[str, Sequence[int]], source, rebuilt: Sequence[str] = ()) -> None:
    """Before a model is built from a checkpoint's or an export's config: every tensor the config-built parts
    (an encoder or decoder given as a mapping of sizes) would have, built on the meta device (no memory),
    must match the weights' shape; a config that asks for other sizes (`n_layer: 2000`) is refused before
    anything is allocated. `rebuilt`: keys the weights leave out on purpose (tied weights)."""
    from captioner.models.decoder import load_decoder
    from captioner.models.towers import build_encoder, random_tower

    # the model core's parts sit under `model.`; older checkpoints hold them at the top
    shapes = {k.removeprefix("model."): v for k, v in shapes.items()}
    rebuilt = [k.removeprefix("model.") for k in rebuilt]
    problems = []
    for part, (fields, pattern) in LAYERS.items():  # a layer count far beyond the weights' is refused before even a meta build
        spec = hparams.get(part)
        if isinstance(spec, Mapping):
            present = {m.group(m.lastindex) for k in shapes for m in [re.match(pattern, k)] if m}
            for field in fields:
                if isinstance(spec.get(field), int) and spec[field] > len(present) + 1:
                    problems.append(f"{part}.{field}={spec[field]} but the weights hold {len(present)} layers")
    built: dict[str, tuple] = {}
    if not problems:
        with torch.device("meta"):
            if random_tower(hparams.get("encoder")):  # a tower loading files checks them itself, strictly
                encoder = build_encoder(dict(hparams["encoder"]))
                built.update({f"encoder.{k}": tuple(v.shape) for k, v in encoder.state_dict().items()})
            if isinstance(hparams.get("decoder"), Mapping):
                wte = next((v for k, v in shapes.items() if re.fullmatch(r"decoder\..*\b(?:wte|embed_tokens)\.weight", k)), None)
                decoder = load_decoder(dict(hparams["decoder"]), _Vocabulary(int(wte[0]) if wte else 50257), seed=0)
                built.update({f"decoder.{k}": tuple(v.shape) for k, v in decoder.state_dict().items()})
        problems += [f"{k}: {tuple(shapes[k])} in the weights, {v} in the config" for k, v in built.items()
                     if k in shapes and tuple(shapes[k]) != v]
        problems += [f"{k}: in the config, not in the weights" for k in built if k not in shapes and k not in rebuilt]
    if problems:
        raise ValueError(f"{source}: its config does not match its weights, refusing to build it: {'; '.join(problems[:5])}")


def read_checkpoint(path: str | os.PathLike, map_location="cpu", mmap: bool = False) -> dict:
    """`torch.load(path, weights_only=True)`; a pickle that would import or call anything is refused
    before any of it runs, with an error naming what it wanted to import. `mmap=True` maps the tensors
    instead of reading them (a look at a large checkpoint's metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        try:
            wanted = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # not a zip checkpoint at all: the load error says enough
            wanted = []
        raise UnsafeCheckpointError(
            f"refusing to load {path}: its pickle would import {wanted or 'non-tensor objects'}, which could run "
            "arbitrary code. Checkpoints written by captioner hold only tensors and plain values; load this file "
            "only if you trust its source, and re-save it (or export it with `python -m captioner.export`)."
        ) from error


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint files written whole or not at all, and read with `weights_only=True`.

    A save goes to a hidden temp file in the same directory (same file system, so the rename is
    atomic), is flushed to disk, then `os.replace`s the target: a SIGKILL or a full disk mid-save
    leaves the previous checkpoint in place, never a truncated one. Trainer: `plugins: [...]`."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(temp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return read_checkpoint(path, map_location)  # never weights_only=False, whatever the caller asks


class RunDirectoryInUseError(ValueError):
    """A fresh run was pointed at a run directory that already holds a run's checkpoint."""


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | os.PathLike) -> str | None:
    """`ckpt_path=auto` resumes this run directory's `checkpoints/last.ckpt` when it exists and starts
    fresh otherwise, so the same command can be re-run (or re-queued) after a crash; any other value
    is a path passed to `Trainer.fit` as is. A fresh run (`null`) into a directory that holds a
    `last.ckpt` is refused: it would overwrite that run's checkpoints and logs."""
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    if ckpt_path is None:
        if last.is_file():
            raise RunDirectoryInUseError(
                f"{last} exists: this run directory holds a run. Resume it with ckpt_path=auto, or start a fresh "
                f"run in another directory (hydra.run.dir=...)")
        return None
    if ckpt_path != "auto":
        if ckpt_path and ckpt_path not in ("last", "hpc") and not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist (use ckpt_path=auto to resume if present)")
        return ckpt_path
    return str(last) if last.is_file() else None


class FreshRunGuard(Callback):
    """Hydra callback of `captioner.train` (conf/train.yaml): refuses a fresh run into a run directory that
    holds a run's `last.ckpt` before Hydra writes anything there (its `.hydra/` record of the first run
    included). A multirun's jobs are checked by `resolve_ckpt_path` when they start."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        try:
            resolve_ckpt_path(config.get("ckpt_path"), config.hydra.run.dir)
        except (RunDirectoryInUseError, FileNotFoundError) as error:
            # Hydra turns a callback's exception into a warning and runs the job anyway: exit here, as
            # `hydra_main` does for bad input (status 2, one line)
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)


def _module_from_hparams(hparams: dict, overrides: dict):
    hparams = {**hparams, **overrides}
    if hparams.get("retrieval"):  # trained with a datastore prompt (captioner/retrieval.py)
        from captioner.retrieval import RetrievalModule

        return RetrievalModule(**hparams)
    from captioner.module import CaptionModule

    return CaptionModule(**hparams)


def _named_file(hparams: Mapping, overrides: dict) -> dict:
    """`encoder=FILE` names the file the model's OpenAI CLIP loads; the block it was trained to read stays its own."""
    saved, given = hparams.get("encoder"), overrides.get("encoder")
    if isinstance(given, (str, os.PathLike)) and isinstance(saved, Mapping) and clip_name(saved) is not None:
        return {**overrides, "encoder": renamed(saved, str(given))}
    return overrides


def _moved(spec) -> bool:
    """A local path that is no longer there (not a published name, not a random build)."""
    import clip

    spec = clip_name(spec) if isinstance(spec, Mapping) else spec
    return isinstance(spec, str) and spec not in clip.available_models() and ("/" in spec or spec.endswith(".pt")) \
        and not Path(spec).expanduser().exists()


def clip_state(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The frozen CLIP of a captioner state dict (keys `encoder.visual.*` / `encoder.text.*`, without the model
    core's `model.` prefix) in clip.model.CLIP's own key layout, which clip.model.build_model reads."""
    state = {("visual." + k[15:] if k.startswith("encoder.visual.") else k[13:]): v
             for k, v in weights.items() if k.startswith(("encoder.visual.", "encoder.text."))}
    state["logit_scale"] = torch.tensor(math.log(1 / 0.07))  # CLIP's initial temperature; captioning never reads it
    return state


def _architectures(hparams: dict, checkpoint: dict, overrides: dict) -> dict:
    """Encoder and decoder specs that rebuild the architectures when their files moved away (a pretrained
    tiny CLIP or decoder in a deleted data/): the weights come from the checkpoint's state dict anyway."""
    import hashlib

    import torch

    specs = {}
    weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}  # keys with or without `model.`
    if "encoder" not in overrides and _moved(hparams.get("encoder")):
        state = clip_state(weights)
        digest = hashlib.sha256(b"".join(v.cpu().numpy().tobytes() for v in state.values())).hexdigest()[:16]
        file = private_dir("encoders") / f"{digest}.pt"  # this user's: no one else can plant a file under this name
        if not file.is_file():
            torch.save(state, file.with_suffix(f".{os.getpid()}"))
            os.replace(file.with_suffix(f".{os.getpid()}"), file)
        specs["encoder"] = renamed(hparams["encoder"], str(file))
    if "decoder" not in overrides and _moved(hparams.get("decoder")) and checkpoint.get("decoder_config"):
        # the saved config of any family, built at random (model_type selects the architecture), then loaded
        config = dict(checkpoint["decoder_config"])
        config.setdefault("model_type", "gpt2")
        specs["decoder"] = {k: v for k, v in config.items() if k not in UNBUILT_CONFIG_KEYS}
    return specs


# config.json entries that describe a saved file rather than the architecture
UNBUILT_CONFIG_KEYS = ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype")


def load_module(path: str | os.PathLike, map_location="cpu", **overrides):
    """A `CaptionModule` in eval mode from a Lightning `.ckpt` or an export directory.

    `overrides` replace saved hyperparameters, e.g. `tokenizer=` when the training run's tokenizer
    directory has moved (an export directory carries its own tokenizer)."""
    path = Path(path)
    if path.is_dir():
        return _load_export(path, map_location, overrides)
    checkpoint = read_checkpoint(path, map_location)
    if "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ValueError(f"{path} is not a captioner Lightning checkpoint (no state_dict / hyper_parameters)")
    hparams = dict(checkpoint["hyper_parameters"])
    overrides = _named_file(hparams, overrides)
    if checkpoint.get("tokenizer_files") and "tokenizer" not in overrides:  # carried by CaptionModule.on_save_checkpoint
        hparams["tokenizer"] = str(write_tokenizer(checkpoint["tokenizer_files"]))
    hparams.update(_architectures(hparams, checkpoint, overrides))
    refuse_named_code(hparams, overrides, path)
    check_sizes({**hparams, **overrides}, {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}, path)
    module = _module_from_hparams(hparams, overrides)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def _load_export(path: Path, map_location, overrides: dict):
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise FileNotFoundError(
            f"{path} is not an export directory: it needs {WEIGHTS} and {CONFIG} (python -m captioner.export ckpt=...)"
        )
    config = json.loads((path / CONFIG).read_text())
    hparams = dict(config["hyper_parameters"])
    overrides = _named_file(hparams, overrides)
    if (path / "tokenizer").is_dir():
        hparams["tokenizer"] = str(path / "tokenizer")
    name = clip_name(hparams.get("encoder"))
    if name is not None and (path / name).is_file():  # the export's clip.pt
        hparams["encoder"] = renamed(hparams["encoder"], str(path / name))
    refuse_named_code(hparams, overrides, path)
    with safe_open(str(path / WEIGHTS), "pt") as header:  # shapes from the header: no tensor is read
        shapes = {k: tuple(header.get_slice(k).get_shape()) for k in header.keys()}
    check_sizes({**hparams, **overrides}, shapes, path, rebuilt=config.get("rebuilt_from_config", []))
    module = _module_from_hparams(hparams, overrides)
    state = load_file(str(path / WEIGHTS), device=str(map_location))
    missing, unexpected = module.load_state_dict(state, strict=False)
    # what the export left out must be rebuilt by the config: pretrained (named) or tied weights
    rebuilt = {k if k.startswith("model.") else "model." + k for k in config.get("rebuilt_from_config", [])}  # older exports: no `model.`
    if unexpected or set(missing) - rebuilt:
        raise ValueError(
            f"{path / WEIGHTS} does not match the model its config builds: "
            f"missing {sorted(set(missing) - rebuilt)[:5]}, unexpected {unexpected[:5]}"
        )
    return module.eval()
