"""python -m captioner.export ckpt=PATH [out=DIR] [scores=scores.json] [onnx=true] [push_to_hub=user/repo]
(conf/export.yaml): a trained model as files that are safe to share, laid out as a Hugging Face Hub model repo.

DIR (default: `export/` beside the checkpoints folder) receives
    model.safetensors  the trainable weights, and any frozen part built at random (it has no other source);
                       published frozen parts are named in the config instead, tied weights stored once
    config.json        the CaptionModule's hyperparameters: `captioner.checkpoint.load_module(DIR)` rebuilds it;
                       it names no path outside DIR, so a copy of DIR works on any machine
    clip.pt            a CLIP that was a local file (a pretrained tiny CLIP): its state dict, read with weights_only
    tokenizer/         the tokenizer's files (save_pretrained's, or GPT-2's vocab.json + merges.txt), so the
                       directory needs nothing from the training run; LoRA adapters are merged into the decoder
    README.md          the model card (captioner/model_card.py): architecture, data, config, scores, command
    onnx/              with onnx=true: the ONNX graphs (captioner/onnx_graphs.py)
No file can run code on load, unlike a pickled checkpoint. The directory is written under a temporary name
beside DIR and renamed into place once whole: a crash leaves the previous export as it was, never new
weights with an old config. push_to_hub=user/repo uploads DIR with huggingface_hub (captioner/hub_repo.py);
`Captioner.from_pretrained("user/repo")` loads it back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from captioner import hub_repo, model_card
from captioner.checkpoint import CONFIG, WEIGHTS, clip_state, load_module, read_checkpoint
from captioner.config import ConfigError, hydra_main
from captioner.models.encoder import clip_name, renamed
from captioner.models.decoder import tokenizer_files

_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK  # what open() gives a new file under the user's umask (0644 at the usual 022)


def _local(spec) -> bool:
    """A spec naming a file or directory of this machine (a pretrained tiny CLIP or GPT-2), not a
    published name: an export carries what it names, since the path means nothing elsewhere."""
    return isinstance(spec, str) and Path(spec).expanduser().exists()


def _exported_weights(module) -> tuple[dict, list[str]]:
    """(tensors to save, state-dict keys the config rebuilds instead)."""
    hp = module.hparams
    pretrained_frozen = []
    if clip_name(hp.encoder) is not None:  # a published name, or the clip.pt the export carries (_local_specs)
        pretrained_frozen.append("model.encoder.")
    if isinstance(hp.decoder, str) and module.model.decoder_mode == "frozen" and not _local(hp.decoder):
        pretrained_frozen.append("model.decoder.")
    tensors, rebuilt, seen = {}, [], set()
    for key, tensor in module.state_dict().items():
        if key.startswith(tuple(pretrained_frozen)) or tensor.data_ptr() in seen:  # named, or tied to one saved
            rebuilt.append(key)
            continue
        seen.add(tensor.data_ptr())
        tensors[key] = tensor.detach().contiguous()
    return tensors, rebuilt


def _copy_tokenizer(module, dest: Path) -> None:
    """The whole tokenizer (its save_pretrained files, or GPT-2's vocab.json + merges.txt) into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, content in tokenizer_files(module.hparams.tokenizer, module.tokenizer).items():
        (dest / name).write_bytes(content.encode("utf-8") if isinstance(content, str) else content)


def _local_specs(module, out: Path) -> dict:
    """Encoder and decoder specs that name nothing outside `out`: a local CLIP file becomes `clip.pt`
    in `out` (its state dict, which `torch.load(weights_only=True)` reads), a local decoder directory its
    config fields with `model_type` (the weights are in model.safetensors). Published names stay as they are."""
    import torch

    from captioner.checkpoint import UNBUILT_CONFIG_KEYS

    specs = {}
    if _local(clip_name(module.hparams.encoder)):
        state = clip_state({k: v.detach().clone() for k, v in module.model.state_dict().items()})  # model.encoder=FILE reads it
        torch.save(state, out / "clip.pt")
        os.chmod(out / "clip.pt", _FILE_MODE)
        specs["encoder"] = renamed(module.hparams.encoder, "clip.pt")  # checkpoint.load_module reads it from the export directory
    if _local(module.hparams.decoder):  # any family: model_type selects the architecture, built at random
        config = module.decoder.config.to_dict()
        specs["decoder"] = {k: v for k, v in config.items() if k not in UNBUILT_CONFIG_KEYS}
    return specs


def export(ckpt: str | Path, out: str | Path | None = None, scores: str | Path | None = None, onnx: bool = False,
           repo_id: str | None = None) -> Path:
    ckpt = Path(ckpt)
    out = Path(out) if out else ckpt.parent.parent / "export"
    step = read_checkpoint(ckpt).get("global_step")  # refuses a code-running pickle before anything else
    module = load_module(ckpt)
    module.model.merge_adapters()  # LoRA: adapters folded into the decoder, which exports as a fine-tuned one
    tensors, rebuilt = _exported_weights(module)
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # same file system as out: the renames are atomic
    shutil.rmtree(temp, ignore_errors=True)
    try:
        temp.mkdir()
        save_file(tensors, str(temp / WEIGHTS), metadata={"format": "pt", "source": ckpt.name})
        os.chmod(temp / WEIGHTS, _FILE_MODE)  # a file to share: readable as any other the user writes
        _copy_tokenizer(module, temp / "tokenizer")
        # relative names only: the directory works wherever it is copied; a LoRA model is saved merged,
        # as a fine-tuned one
        hparams = {**dict(module.hparams), **_local_specs(module, temp), "tokenizer": "tokenizer",
                   "decoder_mode": module.model.decoder_mode, "lora": None}
        config = {"format": "captioner-export", "version": 1, "source": ckpt.name, "global_step": step,
                  "hyper_parameters": hparams, "rebuilt_from_config": rebuilt}
        (temp / CONFIG).write_text(json.dumps(config, indent=1) + "\n")
        model_card.write(temp, module, ckpt, scores, repo_id)
        if onnx:
            from captioner.onnx_graphs import export_onnx

            export_onnx(module, temp)
        _swap_in(temp, out)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return out


def _swap_in(temp: Path, out: Path) -> None:
    """Put the whole directory `temp` at `out`; a previous `out` is moved aside first and deleted after, so
    `out` is at every moment the old export, absent for an instant, or the new one, never a mix."""
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    if out.exists():
        os.replace(out, old)
    os.replace(temp, out)
    shutil.rmtree(old, ignore_errors=True)


@hydra_main("export")
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise ConfigError("ckpt= is missing: name the checkpoint to export, e.g. "
                          "ckpt=outputs/train/runs/<run>/checkpoints/last.ckpt")
    out = export(cfg.ckpt, cfg.out, cfg.scores, cfg.onnx, cfg.push_to_hub)
    size = (out / WEIGHTS).stat().st_size / 2**20
    print(f"exported {cfg.ckpt} -> {out} ({WEIGHTS}: {size:.1f} MiB, {CONFIG}, tokenizer/, README.md"
          f"{', onnx/' if cfg.onnx else ''})")
    if cfg.push_to_hub:
        print(f"pushed {out} -> {hub_repo.push(out, cfg.push_to_hub)}")


if __name__ == "__main__":
    main()
