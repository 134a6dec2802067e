"""The model card (README.md) of an export directory, written with huggingface_hub's ModelCard.

It says what the model is and how it was made, from files the training run left, never by hand:
the architecture from the module's hyperparameters and loaded parts, the training data, config and
reproducing command (its `hydra.overrides.task`) from the `config.yaml` that `captioner.train` writes
in its run directory, and the scores (scene accuracy included) from the run's `scores.json`. The YAML header (license, library,
pipeline tag, tags, base models) is `ModelCardData`, which the Hub indexes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

from captioner.models.decoder import hidden_size

LICENSE = "mit"  # captioner's own; OpenAI CLIP and GPT-2 are MIT-licensed too
LIMITATIONS = """\
- English captions only, in the style of the training captions; a model trained on the embedded synthetic
  shapes world captions only that world.
- Image-text models inherit the biases of their data and of the CLIP and GPT-2 they start from; captions
  can name wrong objects, counts or attributes with confidence. Do not use them for decisions about people.
- The scores below are from the run's own test split; they do not measure performance on other data."""


def _spec(spec) -> str:
    """A part as the config names it: a published name or path, or the sizes of a randomly built one."""
    if isinstance(spec, Mapping) and spec.get("source") in ("open_clip", "transformers"):  # a vision tower (models/towers.py)
        random = spec.get("random") or ("config" in spec and not spec.get("checkpoint"))
        weights = "random weights" if random else f"weights from `{spec.get('checkpoint') or spec.get('path') or spec.get('pretrained')}`"
        return f"{spec['source']} `{spec.get('name') or spec.get('path') or 'model config'}` ({weights}), layer {spec.get('layer', -1)}"
    if isinstance(spec, Mapping) and spec.get("name") is not None:  # an OpenAI CLIP read at another layer
        return f"`{spec['name']}`, layer {spec.get('layer', -1)}"
    if isinstance(spec, Mapping):
        return "built with random weights: " + ", ".join(f"{k}={v}" for k, v in spec.items())
    return f"`{spec}`"


def _scores(scores: Mapping | None) -> str:
    if not scores:
        return "No `scores.json` was found beside the checkpoint (train with `score=true`, or pass `scores=PATH` to the export)."
    rows = ["| metric | score |", "|---|---|"]
    rows += [f"| {name} | {value:.4f} |" for name, value in scores.get("model", {}).items() if isinstance(value, (int, float))]
    scene = scores.get("scene")
    if scene:
        rows.append(f"| scene accuracy | {scene['accuracy']:.4f} ({scene['correct']}/{scene['images']} images) |")
    clip = scores.get("clipscore", {}).get("model", {})
    rows += [f"| {name} | {value:.4f} |" for name, value in clip.items() if isinstance(value, (int, float))]
    return "\n".join(rows)


def _read_yaml(path: Path):
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def build(module, run_dir: Path | None, scores: Mapping | None, repo_id: str | None = None) -> ModelCard:
    """The card of `module` trained in `run_dir` (a Hydra run directory; None when unknown)."""
    hp = module.hparams
    config = _read_yaml(run_dir / "config.yaml") if run_dir else None
    overrides = (((config or {}).get("hydra") or {}).get("overrides") or {}).get("task")
    data = (config or {}).get("data") or {}
    mapper = dict(hp.mapper or {"name": "attention"})
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    # a published decoder name is a Hub model id; CLIP names (ViT-B/32) and local paths are not
    hub_decoder = isinstance(hp.decoder, str) and not hp.decoder.startswith(("/", ".", "~")) and not Path(hp.decoder).expanduser().exists()
    data_card = ModelCardData(
        license=LICENSE, library_name="captioner", pipeline_tag="image-to-text",
        tags=["image-captioning", "clip", "gpt2", "clipcap", f"mapper-{mapper['name']}"],
        base_model=hp.decoder if hub_decoder else None,
    )
    command = "python -m captioner.train " + " ".join(overrides) if overrides is not None else "unknown (no config.yaml in the checkpoint's run directory)"
    loader = repo_id or "path/to/this/folder"
    body = f"""
# captioner: {mapper['name']} mapper over CLIP, GPT-2 decoder

An image captioner made with captioner: a frozen CLIP image encoder, a
**{mapper['name']}** mapper that turns the image features into a prefix of {hp.prefix_length} GPT-2 input
embeddings, and a {module.decoder.config.model_type} decoder ({module.model.decoder_mode}) that writes the caption.

## Architecture

| part | what |
|---|---|
| image encoder (frozen) | CLIP {_spec(hp.encoder)}, features normalised: {hp.normalize_features} |
| mapper | {', '.join(f'{k}={v}' for k, v in mapper.items())}, prefix length {hp.prefix_length} |
| decoder | {module.decoder.config.model_type} {_spec(hp.decoder)}, {module.decoder.config.num_hidden_layers} layers, width {hidden_size(module.decoder)}, {module.model.decoder_mode} |
| parameters | {total:,} ({trainable:,} trained) |

## Training data

{_data(data)}

## Scores (the run's test split)

{_scores(scores)}

## Reproduce

```bash
{command}
```

Training config (from the run's `config.yaml`):

```yaml
{yaml.safe_dump({k: config.get(k) for k in ('model', 'data', 'trainer', 'test_decoding') if k in config} if config else {'model': dict(hp)}, sort_keys=False).strip()}
```

## Use

```python
from captioner.api import Captioner
captioner = Captioner.from_pretrained("{loader}")
captioner.caption("photo.jpg", strategy="beam", num_beams=3)
```

## Limitations

{LIMITATIONS}

## License

{LICENSE.upper()} (the weights and code); the CLIP and GPT-2 it starts from are MIT-licensed by OpenAI.
"""
    return ModelCard(f"---\n{data_card.to_yaml()}\n---\n{body}")


def _data(data: Mapping) -> str:
    if not data:
        return "Unknown: no config.yaml in the checkpoint's run directory."
    synthetic = data.get("synthetic")
    if synthetic:
        return (f"The embedded synthetic world of rendered shapes (captioner/data/synthetic.py): {dict(synthetic.get('sizes', {}))} "
                f"images per split, seed {synthetic.get('seed')}, {synthetic.get('image_size')} px.")
    splits = data.get("splits") or {}
    rows = [f"- {name}: `{(split or {}).get('annotations')}`" for name, split in splits.items()]
    return f"`{data.get('_target_')}` with these annotation files:\n" + "\n".join(rows) if rows else f"`{data.get('_target_')}`"


def write(out: Path, module, ckpt: Path, scores_path: str | Path | None = None, repo_id: str | None = None) -> Path:
    """README.md in `out` for the checkpoint `ckpt` (its run directory is two folders up: run/checkpoints/x.ckpt)."""
    run_dir = ckpt.parent.parent
    scores_file = Path(scores_path) if scores_path else run_dir / "scores.json"
    if scores_path and not scores_file.is_file():
        raise FileNotFoundError(f"scores={scores_path} does not exist (a scores.json from training or captioner.evaluate)")
    scores = json.loads(scores_file.read_text()) if scores_file.is_file() else None
    card = build(module, run_dir if (run_dir / "config.yaml").is_file() else None, scores, repo_id)
    card.save(out / "README.md")
    return out / "README.md"
