"""python -m captioner.export ckpt=PATH [out=DIR] [scores=scores.json] [onnx=true] [push_to_hub=user/repo]:
a trained model as files that are safe to share, laid out as a Hugging Face Hub model repo.

DIR (default: `export/` beside the checkpoints folder) receives
    model.safetensors  the trainable weights, and any frozen part built at random (it has no other source);
                       pretrained frozen parts are named in the config instead, tied weights stored once
    config.json        the CaptionModule's hyperparameters: `captioner.checkpoint.load_module(DIR)` rebuilds it
    tokenizer/         vocab.json + merges.txt, so the directory needs nothing from the training run
    README.md          the model card (captioner/model_card.py): architecture, data, config, scores, command
    onnx/              with onnx=true: the ONNX graphs (captioner/onnx_graphs.py)
Neither weights file can run code on load, unlike a pickle. push_to_hub=user/repo uploads DIR with
huggingface_hub (captioner/hub_repo.py); `Captioner.from_pretrained("user/repo")` loads it back.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file

from captioner import hub_repo, model_card
from captioner.checkpoint import CONFIG, WEIGHTS, load_module, read_checkpoint


def _exported_weights(module) -> tuple[dict, list[str]]:
    """(tensors to save, state-dict keys the config rebuilds instead)."""
    hp = module.hparams
    pretrained_frozen = []
    if isinstance(hp.encoder, str):
        pretrained_frozen.append("encoder.")
    if isinstance(hp.decoder, str) and hp.freeze_decoder:
        pretrained_frozen.append("decoder.")
    tensors, rebuilt, seen = {}, [], set()
    for key, tensor in module.state_dict().items():
        if key.startswith(tuple(pretrained_frozen)) or tensor.data_ptr() in seen:  # named, or tied to one saved
            rebuilt.append(key)
            continue
        seen.add(tensor.data_ptr())
        tensors[key] = tensor.detach().contiguous()
    return tensors, rebuilt


def _copy_tokenizer(spec: str, dest: Path) -> None:
    """vocab.json + merges.txt from the training tokenizer's directory, or from the hub cache for a name."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        source = Path(spec).expanduser() / name
        if not source.is_file():
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec, name)
            if not isinstance(cached, str):
                raise FileNotFoundError(f"tokenizer file {name} of {spec!r} not found (model.tokenizer)")
            source = Path(cached)
        shutil.copyfile(source, dest / name)


def export(ckpt: str | Path, out: str | Path | None = None, scores: str | Path | None = None, onnx: bool = False,
           repo_id: str | None = None) -> Path:
    ckpt = Path(ckpt)
    out = Path(out) if out else ckpt.parent.parent / "export"
    step = read_checkpoint(ckpt).get("global_step")  # refuses a code-running pickle before anything else
    module = load_module(ckpt)
    tensors, rebuilt = _exported_weights(module)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt", "source": ckpt.name})
    _copy_tokenizer(module.hparams.tokenizer, out / "tokenizer")
    hparams = {**dict(module.hparams), "tokenizer": "tokenizer"}  # load_module points it at out/tokenizer
    config = {"format": "captioner-export", "version": 1, "source": str(ckpt), "global_step": step,
              "hyper_parameters": hparams, "rebuilt_from_config": rebuilt}
    (out / CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    model_card.write(out, module, ckpt, scores, repo_id)
    if onnx:
        from captioner.onnx_graphs import export_onnx

        export_onnx(module, out)
    return out


USAGE = ("usage: python -m captioner.export ckpt=outputs/.../checkpoints/last.ckpt [out=DIR] [scores=scores.json] "
         "[onnx=true] [push_to_hub=user/repo]")
OPTIONS = {"ckpt", "out", "scores", "onnx", "push_to_hub"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(f"{USAGE}\n\n{__doc__}")
        return
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    if "ckpt" not in args or set(args) - OPTIONS or len(args) != len(argv) or args.get("onnx", "false") not in ("true", "false"):
        raise SystemExit(USAGE)
    repo_id = args.get("push_to_hub")
    out = export(args["ckpt"], args.get("out"), args.get("scores"), args.get("onnx") == "true", repo_id)
    size = (out / WEIGHTS).stat().st_size / 2**20
    print(f"exported {args['ckpt']} -> {out} ({WEIGHTS}: {size:.1f} MiB, {CONFIG}, tokenizer/, README.md"
          f"{', onnx/' if args.get('onnx') == 'true' else ''})")
    if repo_id:
        print(f"pushed {out} -> {hub_repo.push(out, repo_id)}")


if __name__ == "__main__":
    main()
