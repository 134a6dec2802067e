"""python -m captioner.import_clipcap SRC.pt --mapper mlp|transformer --prefix-length P [--clip-length L]
       --clip ViT-B/32|RN50x4|/path/clip.pt|'{...CLIP args...}' [--tokenizer gpt2|DIR] -o OUT.ckpt

Turns a ClipCap checkpoint (rmokady/CLIP_prefix_caption: a `ClipCaptionModel` state dict) into a
captioner Lightning checkpoint, loadable with `CaptionModule.load_from_checkpoint(OUT, weights_only=True)`
and by everything else here (evaluation, the web app), with identical logits (tests/test_clipcap_import.py).

ClipCap's keys:  gpt.*            GPT-2 -> decoder.* (its sizes are read from the tensors)
                 clip_project.*   the mapper -> mapper.* (ClipCap's parameter names, kept verbatim)
Checkpoints saved by older transformers also hold `gpt.transformer.h.{i}.attn.bias` (the causal mask)
and `attn.masked_bias` (-1e4): buffers today's GPT-2 builds itself, so they are dropped.

Which CLIP embedding the published models expect (ClipCap's notebooks):
    coco_weights.pt, conceptual_weights.pt   MLP, ViT-B/32, P=10         the raw embedding
    transformer_weights.pt                   transformer, RN50x4, P=L=40  the L2-normalised embedding
The imported module's `normalize_features` follows the mapper kind (--normalize / --no-normalize to
override it for a model trained otherwise, e.g. ClipCap's `--normalize_prefix` flag with an MLP).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch

from captioner.models.zoo import GPT2_ARCHS

# the embedding each published ClipCap model was trained on, by mapper kind
EXPECTS_NORMALIZED = {"mlp": False, "transformer": True}
STALE = re.compile(r"^gpt\.transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


class ClipCapImportError(ValueError):
    """The source checkpoint does not match the ClipCap layout or the options given."""


def read_clipcap(path: str | Path) -> dict[str, torch.Tensor]:
    """A ClipCap state dict (tensors only: read with `weights_only=True`), `module.` prefixes removed."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ClipCapImportError(f"{path} is not a state dict of tensors (ClipCap saves `model.state_dict()`)")
    return {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel saves


def gpt2_config(state: Mapping[str, torch.Tensor], num_heads: int | None = None) -> dict:
    """GPT2Config fields read from the tensors; the head count is not in any shape, and every GPT-2
    (small to xl, distilgpt2) uses 64-wide heads, so it defaults to n_embd / 64."""
    wte, wpe = state["gpt.transformer.wte.weight"], state["gpt.transformer.wpe.weight"]
    n_layer = sum(1 for k in state if re.fullmatch(r"gpt\.transformer\.h\.\d+\.ln_1\.weight", k))
    n_embd = wte.shape[1]
    return {"vocab_size": wte.shape[0], "n_positions": wpe.shape[0], "n_embd": n_embd, "n_layer": n_layer,
            "n_head": num_heads or max(1, n_embd // 64)}


def mapper_config(state: Mapping[str, torch.Tensor], kind: str, embed_dim: int, num_heads: int) -> tuple[dict, int, int]:
    """(mapper arguments, prefix length, CLIP input width), read from the `clip_project.*` tensors."""
    if kind == "mlp":
        linears = sum(1 for k in state if re.fullmatch(r"clip_project\.model\.\d+\.weight", k))  # Tanh between: 0, 2, ...
        if not linears:
            raise ClipCapImportError("no clip_project.model.{0,2}.* keys: is this a transformer-mapper checkpoint? (--mapper transformer)")
        last = state[f"clip_project.model.{2 * (linears - 1)}.weight"]  # (P*D, P*D/2)
        return {"name": "mlp", "num_layers": linears}, last.shape[0] // embed_dim, state["clip_project.model.0.weight"].shape[1]
    if "clip_project.prefix_const" not in state:
        raise ClipCapImportError("no clip_project.prefix_const: is this an MLP-mapper checkpoint? (--mapper mlp)")
    num_layers = sum(1 for k in state if re.fullmatch(r"clip_project\.transformer\.layers\.\d+\.norm1\.weight", k))
    hidden = state["clip_project.transformer.layers.0.mlp.fc1.weight"].shape[0]
    linear = state["clip_project.linear.weight"]  # (L*D, E)
    args = {"name": "transformer", "clip_length": linear.shape[0] // embed_dim, "num_layers": num_layers,
            "num_heads": num_heads, "mlp_ratio": hidden / embed_dim}
    return args, state["clip_project.prefix_const"].shape[0], linear.shape[1]


def convert(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """ClipCap keys -> CaptionModule keys, and the stale keys dropped on the way."""
    out, dropped = {}, []
    for key, value in state.items():
        if STALE.match(key):
            dropped.append(key)
        elif key.startswith("gpt."):
            out["model.decoder." + key.removeprefix("gpt.")] = value
        elif key.startswith("clip_project."):
            out["model.mapper." + key.removeprefix("clip_project.")] = value
        else:
            raise ClipCapImportError(f"unexpected key {key!r}: ClipCap checkpoints hold only gpt.* and clip_project.*")
    if "model.decoder.lm_head.weight" not in out:  # GPT-2 ties its output layer to the token embeddings
        out["model.decoder.lm_head.weight"] = out["model.decoder.transformer.wte.weight"]
    return out, dropped


def import_clipcap(
    source: str | Path,
    mapper: str,
    clip: str | Mapping,
    tokenizer: str = "gpt2",
    prefix_length: int | None = None,
    clip_length: int | None = None,
    normalize: bool | None = None,
    num_heads: int = 8,
    decoder_heads: int | None = None,
    freeze_decoder: bool = False,
):
    """The CaptionModule holding a ClipCap checkpoint's weights, and a description of the import."""
    from captioner.module import CaptionModule

    if mapper not in EXPECTS_NORMALIZED:
        raise ClipCapImportError(f"--mapper {mapper!r}: ClipCap has only {sorted(EXPECTS_NORMALIZED)}")
    state = read_clipcap(source)
    if "gpt.transformer.wte.weight" not in state:
        raise ClipCapImportError(f"{source} has no gpt.transformer.wte.weight: not a ClipCap ClipCaptionModel state dict")
    decoder = gpt2_config(state, decoder_heads)
    mapper_args, found_prefix, clip_dim = mapper_config(state, mapper, decoder["n_embd"], num_heads)
    for flag, given, found in (("--prefix-length", prefix_length, found_prefix), ("--clip-length", clip_length, mapper_args.get("clip_length"))):
        if given is not None and found is not None and given != found:
            raise ClipCapImportError(f"{flag} {given} disagrees with the checkpoint's tensors, which hold {found}")
    normalize = EXPECTS_NORMALIZED[mapper] if normalize is None else normalize
    module = CaptionModule(
        encoder=clip, decoder=decoder, tokenizer=tokenizer, mapper=mapper_args, prefix_length=found_prefix,
        freeze_decoder=freeze_decoder, normalize_features=normalize,
    )
    if module.encoder.embed_dim != clip_dim:
        raise ClipCapImportError(
            f"the mapper reads {clip_dim}-dim CLIP embeddings but --clip {clip!r} gives {module.encoder.embed_dim}: "
            "ClipCap's MLP models use ViT-B/32 (512), its transformer model RN50x4 (640)"
        )
    weights, dropped = convert(state)
    missing, unexpected = module.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("model.encoder.")]  # CLIP comes from --clip
    if missing or unexpected:
        raise ClipCapImportError(f"{source} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    arch = next((name for name, fields in GPT2_ARCHS.items() if all(decoder[k] == v for k, v in fields.items())), None)
    report = {
        "source": str(source),
        "mapper": mapper_args,
        "prefix_length": found_prefix,
        "decoder": arch or decoder,
        "clip": clip,
        "normalize_features": normalize,
        "dropped_keys": len(dropped),
        "note": (
            "ClipCap's published MLP models (coco_weights.pt, conceptual_weights.pt; ViT-B/32, P=10) expect the raw "
            "CLIP embedding; its transformer model (transformer_weights.pt; RN50x4, P=L=40) the L2-normalised one. "
            f"This checkpoint {'L2-normalises' if normalize else 'does not normalise'} CLIP features before the mapper."
        ),
    }
    return module.eval(), report


def save(module, report: dict, out: str | Path) -> Path:
    """A Lightning-format checkpoint of plain values and tensors (loads with `weights_only=True`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": L.__version__,
        "epoch": 0,
        "global_step": 0,
        "clipcap_import": json.loads(json.dumps(report, default=str)),
    }
    torch.save(checkpoint, out)
    return out


def _clip_spec(value: str) -> str | dict:
    return json.loads(value) if value.lstrip().startswith("{") else value


def own_options(error: Exception) -> str:
    """The loaders' message with this command's options in place of the config keys they name."""
    message = str(error).replace("model.encoder=", "--clip ").replace("model.encoder", "--clip")
    return message.replace("model.tokenizer=", "--tokenizer ").replace("model.tokenizer", "--tokenizer")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m captioner.import_clipcap", description="Import a ClipCap checkpoint.",
                                     epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="ClipCap state dict (.pt)")
    parser.add_argument("--mapper", required=True, choices=sorted(EXPECTS_NORMALIZED))
    parser.add_argument("--prefix-length", type=int, help="checked against the tensors (ClipCap's --prefix_length)")
    parser.add_argument("--clip-length", type=int, help="transformer only; checked against the tensors (--prefix_length_clip)")
    parser.add_argument("--clip", required=True, type=_clip_spec,
                        help="CLIP the mapper was trained on: a name (ViT-B/32, RN50x4), a local .pt, or a JSON mapping of clip.model.CLIP args")
    parser.add_argument("--tokenizer", default="gpt2", help="GPT-2's tokenizer: a hub name or a directory with vocab.json + merges.txt")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="L2-normalise CLIP features before the mapper (default: yes for transformer, no for mlp)")
    parser.add_argument("--num-heads", type=int, default=8, help="transformer mapper heads (ClipCap: 8)")
    parser.add_argument("--decoder-heads", type=int, help="GPT-2 heads (default n_embd/64, as in every GPT-2)")
    parser.add_argument("--freeze-decoder", action="store_true", help="for later fine-tuning: keep GPT-2 frozen (ClipCaptionPrefix)")
    parser.add_argument("-o", "--out", required=True, help="output .ckpt")
    args = parser.parse_args(argv)
    from captioner.models.hub import MissingWeightsError

    if not Path(args.source).is_file():
        parser.exit(2, f"error: ClipCap checkpoint {args.source} does not exist\n")
    try:
        module, report = import_clipcap(
            args.source, args.mapper, args.clip, args.tokenizer, args.prefix_length, args.clip_length,
            args.normalize, args.num_heads, args.decoder_heads, args.freeze_decoder,
        )
    except (ValueError, FileNotFoundError, MissingWeightsError) as e:  # absent CLIP or GPT-2 files, a mismatch
        parser.exit(2, f"error: {own_options(e.__cause__ if isinstance(e.__cause__, MissingWeightsError) else e)}\n")
    out = save(module, report, args.out)
    print(json.dumps({**report, "out": str(out)}, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
