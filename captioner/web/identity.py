"""Which model a server answers with and what it was trained on, read from the checkpoint itself.

A Lightning checkpoint carries the module's hyperparameters (encoder, decoder, mapper) and the data
module's (its splits, or the embedded synthetic world's sizes); an export directory carries the
module's in its config.json and no data config, which the description then says.
"""

from __future__ import annotations

import json
from pathlib import Path

from captioner.checkpoint import read_checkpoint


def describe_model(path: str | Path) -> dict:
    """{"checkpoint", "encoder", "decoder", "mapper", "prefix_length", "steps", "trained_on", "summary"}."""
    path = Path(path)
    if path.is_dir():
        hparams, data, steps = json.loads((path / "config.json").read_text()), None, None
    else:
        checkpoint = read_checkpoint(path)
        hparams, data = checkpoint.get("hyper_parameters", {}), checkpoint.get("datamodule_hyper_parameters")
        steps = checkpoint.get("global_step")
    mapper = hparams.get("mapper") or {"name": "attention"}
    model = {
        "checkpoint": str(path),
        "encoder": _name(hparams.get("encoder")),
        "decoder": _name(hparams.get("decoder")),
        "mapper": mapper.get("name", "attention") if isinstance(mapper, dict) else str(mapper),
        "prefix_length": hparams.get("prefix_length"),
        "steps": steps,
        "trained_on": trained_on(data),
    }
    trained = f", {steps} training steps" if steps is not None else ""
    model["summary"] = (f"{model['mapper']} mapper: {model['encoder']} -> {model['decoder']}{trained}; "
                        f"trained on {model['trained_on']['dataset']}")
    return model


def trained_on(data: dict | None) -> dict:
    """The training data named from a data module's hyperparameters."""
    if not data:
        return {"dataset": "unknown (the checkpoint carries no data config)"}
    synthetic = data.get("synthetic")
    if synthetic:
        sizes = synthetic.get("sizes", {})
        return {"dataset": f"the embedded synthetic shapes world ({sizes.get('train', '?')} training scenes): "
                           "it describes coloured shapes, not photos", "train_images": sizes.get("train"),
                "seed": synthetic.get("seed")}
    train = (data.get("splits") or {}).get("train") or {}
    sources = [str(v) for v in train.values() if isinstance(v, str)]
    return {"dataset": sources[0] if sources else "unknown (no train split in the checkpoint)", "train_split": train}


def _name(spec) -> str | None:
    """A model spec as a short name: a hub name as is, a local path by its last part, a dict by its name."""
    if isinstance(spec, dict) and spec.get("name"):  # a name, or a file read at a chosen layer
        return _name(spec["name"])
    if isinstance(spec, dict):
        return str((spec.get("path") and Path(str(spec["path"])).name) or spec.get("model_type") or "built from its config")
    if spec is None:
        return None
    return Path(str(spec)).name if ("/" in str(spec) and Path(str(spec)).is_absolute()) else str(spec)
