"""transformers towers: CLIPModel / CLIPVisionModel / SiglipModel / SiglipVisionModel (and their Auto kin) from a
local `save_pretrained` directory, a hub name, or a config mapping built at any size.

    {source: transformers, path: /path/siglip-base-patch16-224, layer: -1}
    {source: transformers, name: google/siglip-base-patch16-224}     # downloads where huggingface.co answers
    {source: transformers, config: {model_type: siglip, vision_config: {...}, text_config: {...}}, seed: 0}

The directory's own image processor (preprocessor_config.json: size, crop, mean/std, resample) preprocesses; a
config mapping gets its family's processor at the config's image size. `clip_features` is `get_image_features`
(a vision-only model: its `pooler_output`, or `image_embeds` with a projection); `patch_tokens` are
`hidden_states[layer + 1]` (hidden_states[0] is the embeddings) less the class token CLIP has and SigLIP has not.
Text embeddings (`get_text_features`) need a text tower and the directory's tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from captioner.models.hub import missing, reachable
from captioner.models.tower import Tower, local_file

PROCESSORS = {"clip": "CLIPImageProcessor", "siglip": "SiglipImageProcessor"}  # a config mapping's preprocessing


class PixelsOf:
    """The image processor as a transform: PIL image -> (3, H, W) pixel values."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def _vision_config(config):
    return getattr(config, "vision_config", None) or config


def load_transformers(spec: Mapping):
    """(model, image processor, tokenizer source or None) for `spec` (module docstring)."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    given = [k for k in ("path", "name", "config") if spec.get(k) is not None]
    if len(given) != 1:
        raise ValueError("model.encoder: a transformers tower needs exactly one of `path` (a save_pretrained directory), "
                         f"`name` (a hub name) or `config` (a config mapping with model_type), not {given or 'none'}")
    if "config" in given:
        config = AutoConfig.for_model(**dict(spec["config"]))
        with torch.random.fork_rng(devices=[]):  # seeded random weights without moving the run's random stream
            torch.manual_seed(spec.get("seed", 0))
            model = AutoModel.from_config(config)
        family = config.model_type.removesuffix("_vision_model")
        if family not in PROCESSORS:
            raise ValueError(f"model.encoder.config.model_type={config.model_type!r}: choose a CLIP or SigLIP family "
                             f"({sorted(PROCESSORS)}, or their _vision_model)")
        size = _vision_config(config).image_size
        processor_class = getattr(transformers, PROCESSORS[family])
        processor = processor_class(size={"shortest_edge": size}, crop_size={"height": size, "width": size}) \
            if family == "clip" else processor_class(size={"height": size, "width": size})
        return model, processor, spec.get("tokenizer")
    if "name" in given:
        source = spec["name"]
        cached = Path(source).expanduser().is_dir()
        if not cached and not reachable("huggingface.co"):
            raise missing("transformers", source, "model.encoder.path", "huggingface.co")
    else:
        source = str(local_file(spec, "path", "save_pretrained directory"))
        if not (Path(source) / "config.json").is_file():
            raise FileNotFoundError(f"model.encoder.path: {source} holds no config.json; save the model there with save_pretrained")
    config = AutoConfig.from_pretrained(source)
    architecture = (config.architectures or [""])[0]
    # a vision model with a projection (CLIPVisionModelWithProjection) is its own class; AutoModel would drop the head
    model_class = getattr(transformers, architecture) if architecture.endswith("WithProjection") else AutoModel
    model = model_class.from_pretrained(source)
    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except OSError:
        raise FileNotFoundError(f"model.encoder: {source} has no image processor (preprocessor_config.json); save the "
                                "model's processor there too (AutoProcessor.from_pretrained(...).save_pretrained(DIR))") from None
    return model, processor, spec.get("tokenizer") or source


class TransformersTower(Tower):
    source = "transformers"

    def __init__(self, spec: Mapping, precision: str = "fp32"):
        super().__init__(spec, precision)
        self.model, self.processor, self._tokenizer_source = load_transformers(self.spec)
        self._tokenizer = None
        self.has_text = hasattr(self.model, "get_text_features")
        vision = _vision_config(self.model.config)
        self.resolution = vision.image_size
        embeddings = self.visual.embeddings
        self.prefix = 1 if hasattr(embeddings, "class_embedding") else 0  # CLIP's class token; SigLIP has none
        self._finish(precision, vision.num_hidden_layers)

    @property
    def visual(self):
        return getattr(self.model, "vision_model", self.model)

    def grid(self) -> tuple[int, int]:
        vision = _vision_config(self.model.config)
        side = vision.image_size // vision.patch_size
        return side, side

    @property
    def preprocess(self):
        return PixelsOf(self.processor)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = self._device_pixels(pixels)
        if hasattr(self.model, "get_image_features"):  # CLIPModel, SiglipModel: the projected pooled embedding
            out = self.model.get_image_features(pixel_values=pixels, output_hidden_states=True)
            pooled = out.pooler_output
        else:
            out = self.model(pixel_values=pixels, output_hidden_states=True)
            pooled = out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output
        tokens = out.hidden_states[self.layer + 1][:, self.prefix:]  # (B, N, W): the chosen block's output
        return {"clip_features": pooled.float(), "patch_tokens": tokens.float()}

    def tokenizer(self):
        if not self.has_text:
            raise self.refuse_text(f"is a {type(self.model).__name__}, which has no text tower")
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                if not self._tokenizer_source:
                    raise OSError
                self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_source)
            except (OSError, ValueError):
                raise self.refuse_text(f"has no tokenizer in {self._tokenizer_source or 'its config'}; save the model's "
                                       "tokenizer beside it, or set model.encoder.tokenizer=DIR") from None
        return self._tokenizer

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Text embeddings (B, E): `get_text_features`. SigLIP was trained on captions padded to its full length."""
        tokenizer = self.tokenizer()
        text = self.model.config.text_config
        padding = "max_length" if text.model_type.startswith("siglip") else True
        batch = tokenizer(list(texts), padding=padding, truncation=True, max_length=text.max_position_embeddings, return_tensors="pt")
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        out = self.model.get_text_features(**inputs)
        return (out if isinstance(out, torch.Tensor) else out.pooler_output).float()
