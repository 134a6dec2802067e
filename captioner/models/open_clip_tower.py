"""open_clip towers (SigLIP, EVA02, DFN, LAION ViTs, ...): a built-in model name with a local checkpoint file, a
published tag, or a model config mapping built at any size.

    {source: open_clip, name: ViT-B-16-SigLIP, checkpoint: /path/open_clip_pytorch_model.bin, layer: -1}
    {source: open_clip, name: ViT-B-16, pretrained: dfn2b}          # downloads where huggingface.co answers
    {source: open_clip, config: {embed_dim: 64, vision_cfg: {...}, text_cfg: {...}}, seed: 0}   # random weights

`checkpoint` is what `open_clip.create_model(name, pretrained=FILE)` reads (a state dict saved with torch.save,
safetensors, or big_vision .npz). A local file carries no preprocessing, so the release's own (the first published
tag of `name`: SigLIP's 0.5 mean/std and squash resize, OpenAI's for CLIP ViTs) is used; `preprocess:` overrides
it. `layer` picks the block whose patch tokens the mapper reads (-1: the last), without prefix tokens: a SigLIP
trunk has none, a CLIP ViT one class token. `clip_features` is `encode_image(normalize=False)`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch

from captioner.models.hub import missing, reachable
from captioner.models.tower import Tower, local_file

PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")


def _release_preprocess(name: str) -> dict:
    """The preprocessing open_clip publishes with `name`'s first tag (every tag of a name shares it)."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    cfg = open_clip.get_pretrained_cfg(name, tags[0]) if tags else {}
    return {k: cfg[k] for k in PREPROCESS_KEYS if k in cfg}


def _refused(checkpoint, label: str, error: Exception) -> ValueError:
    # strict loading lists every mismatched key (its first line names the problem); a state dict of another
    # model can also trip open_clip's own conversions (AttributeError, KeyError)
    first = (str(error).splitlines() or [""])[0]
    return ValueError(f"model.encoder.checkpoint {checkpoint} does not hold {label}'s weights ({type(error).__name__}: {first})")


def _strict_load(model, checkpoint, label: str) -> None:
    import open_clip

    try:
        open_clip.load_checkpoint(model, str(checkpoint))
    except (RuntimeError, AttributeError, KeyError) as e:
        raise _refused(checkpoint, label, e) from None


def load_open_clip(spec: Mapping):
    """The open_clip model `spec` names (module docstring), its weights loaded, seeded when random."""
    import open_clip
    from open_clip.model import CLIP, CustomTextCLIP, set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg

    if ("name" in spec) == ("config" in spec):
        raise ValueError("model.encoder: an open_clip tower needs `name` (a built-in model such as ViT-B-16-SigLIP; "
                         "open_clip.list_models()) or `config` (a model config mapping), exactly one of them")
    checkpoint = local_file(spec, "checkpoint", "checkpoint file") if spec.get("checkpoint") else None
    overrides = dict(spec.get("preprocess") or {})
    with torch.random.fork_rng(devices=[]):  # seeded random weights without moving the run's random stream
        torch.manual_seed(spec.get("seed", 0))
        if "config" in spec:
            cfg = copy.deepcopy(dict(spec["config"]))
            custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
            model = (CustomTextCLIP if custom else CLIP)(**cfg)
            if checkpoint:
                _strict_load(model, checkpoint, "model.encoder.config")
            size = model.visual.image_size
            preprocess = {**PreprocessCfg().__dict__, "size": size[0] if isinstance(size, tuple) else size, **overrides}
            set_model_preprocess_cfg(model, preprocess)
            return model
        name = spec["name"]
        if name not in open_clip.list_models():
            raise ValueError(f"model.encoder.name={name!r} is not one of open_clip's models (open_clip.list_models())")
        pretrained = None
        if checkpoint:
            pretrained = str(checkpoint)
        elif spec.get("pretrained"):
            tags = open_clip.list_pretrained_tags_by_model(name)
            if spec["pretrained"] not in tags:
                raise ValueError(f"model.encoder.pretrained={spec['pretrained']!r}: {name} is published as {tags}")
            if not reachable("huggingface.co"):
                raise missing("open_clip", f"{name}/{spec['pretrained']}", "model.encoder.checkpoint", "huggingface.co")
            pretrained = spec["pretrained"]
        elif not spec.get("random"):
            raise ValueError(f"model.encoder: open_clip {name} needs its weights: checkpoint: FILE (a local file), "
                             "pretrained: TAG (downloaded), or random: true (random weights, for tests)")
        try:
            return open_clip.create_model(name, pretrained=pretrained, pretrained_text=False,
                                          force_preprocess_cfg={**_release_preprocess(name), **overrides})
        except (RuntimeError, AttributeError, KeyError) as e:
            if checkpoint:
                raise _refused(checkpoint, name, e) from None
            raise


class OpenClipTower(Tower):
    source = "open_clip"
    has_text = True  # every open_clip model is a CLIP: image and text towers

    def __init__(self, spec: Mapping, precision: str = "fp32"):
        super().__init__(spec, precision)
        self.model = load_open_clip(self.spec)
        v = self.model.visual
        self.timm = hasattr(v, "trunk")  # SigLIP, EVA02 and other timm trunks; else open_clip's own ViT
        if not hasattr(v, "forward_intermediates"):
            raise ValueError(f"{self.describe()}: its image tower ({type(v).__name__}) gives no patch tokens of a layer")
        blocks = v.trunk.blocks if self.timm else v.transformer.resblocks
        size = v.image_size
        self.resolution = size[0] if isinstance(size, tuple) else size
        self._tokenizer = None
        self._finish(precision, len(blocks))

    @property
    def visual(self):
        return self.model.visual

    def grid(self) -> tuple[int, int]:
        v = self.model.visual
        return tuple(v.trunk.patch_embed.grid_size if self.timm else v.grid_size)

    @property
    def preprocess(self):
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**self.model.visual.preprocess_cfg), is_train=False)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model.forward_intermediates(image=self._device_pixels(pixels), image_indices=[self.layer],
                                               normalize=False, image_output_fmt="NLC")
        # image_intermediates: the chosen block's output with the prefix (class, register) tokens removed
        return {"clip_features": out["image_features"].float(), "patch_tokens": out["image_intermediates"][0].float()}

    def _text_config(self) -> dict:
        import open_clip

        cfg = self.spec["config"] if "config" in self.spec else open_clip.get_model_config(self.spec["name"])
        return dict(cfg.get("text_cfg", {}))

    def tokenizer(self):
        """open_clip's tokenizer for this model: `tokenizer: DIR` (a saved HF tokenizer), the config's
        `hf_tokenizer_name` (downloaded), or CLIP's own BPE."""
        if self._tokenizer is None:
            import open_clip
            from open_clip.tokenizer import HFTokenizer

            text = self._text_config()
            length, kwargs = text.get("context_length", 77), dict(text.get("tokenizer_kwargs") or {})
            source = str(local_file(self.spec, "tokenizer", "tokenizer directory")) if self.spec.get("tokenizer") \
                else text.get("hf_tokenizer_name")
            if source and not self.spec.get("tokenizer"):
                source = self._cached(source)
            if source and not Path(source).is_dir() and not reachable("huggingface.co"):
                raise self.refuse_text(f"reads captions with the tokenizer {source!r}, which huggingface.co would give "
                                       f"and cannot be reached; save it (AutoTokenizer.from_pretrained({source!r})"
                                       ".save_pretrained(DIR)) and set model.encoder.tokenizer=DIR")
            self._tokenizer = HFTokenizer(source, context_length=length, tokenizer_mode=text.get("tokenizer_mode"), **kwargs) \
                if source else open_clip.SimpleTokenizer(context_length=length, **kwargs)
        return self._tokenizer

    @staticmethod
    def _cached(repo: str) -> str:
        """The local snapshot of a hub tokenizer when the cache holds one (no network), else its name."""
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(repo, local_files_only=True)
        except Exception:  # not cached (huggingface_hub raises several kinds): the name, downloaded if reachable
            return repo

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Text embeddings (B, E): `encode_text(normalize=False)` of open_clip."""
        tokens = self.tokenizer()(list(texts)).to(next(self.model.parameters()).device)
        return self.model.encode_text(tokens, normalize=False).float()
