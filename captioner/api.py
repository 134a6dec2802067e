"""The Python API: `Captioner.from_pretrained(path).caption(images, **decoding)`.

One implementation of "image in, caption out", used by the web app and the CLI:

    from captioner.api import Captioner
    captioner = Captioner.from_pretrained("outputs/train/runs/.../checkpoints/last.ckpt")
    captioner.caption("photo.jpg")                          # -> "a dog on a couch"
    captioner.caption(["a.jpg", pil_image], strategy="beam", num_beams=3)  # -> [str, str]
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from captioner import checkpoint, hub_repo, prepack, quantize
from captioner.data.images import ImageLike, to_pil
from captioner.generate import Decoding, decoding_from
from captioner.models.encoder import DTYPES, dtype_of
from captioner.models.mapper import attention_grid


@dataclass(frozen=True)
class Caption:
    text: str
    attention: torch.Tensor | None = None  # (P, g, g): where each prefix slot looked (mappers that return maps only)
    retrieved: tuple[str, ...] | None = None  # the datastore captions in the prompt (retrieval models only)


def load_module(path: str | Path, **overrides):
    """A CaptionModule from a Lightning checkpoint or an exported directory (captioner/checkpoint.py);
    `overrides` replace saved hyperparameters (`encoder=` a CLIP file the user vouches for)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass a .ckpt file from a run's checkpoints/ folder")
    return checkpoint.load_module(path, **overrides)


def _as_list(images) -> tuple[list, bool]:
    """(items, single): a batch tensor (B, C, H, W) is B images; a str/Path/PIL/(C, H, W) is one."""
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return list(images), False
    if isinstance(images, (str, Path, Image.Image, torch.Tensor)):
        return [images], True
    return list(images), False


def native_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check and check())


class Captioner:
    """A trained model in eval mode, with image loading, preprocessing and decoding.

    `module` is the LightningModule a checkpoint holds (its hyperparameters; a retrieval model's
    datastore); `model`, its `CaptionModel`, computes every caption."""

    def __init__(self, module, device: str | torch.device = "cpu"):
        self.module = module.to(device).eval()
        self.model = module.model
        self.device = torch.device(device)
        self.preprocess = self.model.encoder.preprocess  # CLIP's resize, centre crop and normalisation
        self.resolution = self.model.encoder.resolution
        # the mapper's declared capability; ONNX graphs return no maps (their mapper is a plain function)
        self.has_attention = bool(getattr(self.model.mapper, "returns_attention", False))
        self.max_new_tokens = self.model.max_new_tokens  # the decoder's positions, less the prefix's
        quantized = any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in self.model.decoder.modules())
        self.precision = "int8" if quantized else {v: k for k, v in DTYPES.items()}[self.model.decoder.dtype]  # the decoder's

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", int8: bool = False, precision: str = "fp32",
                        datastore: str | Path | None = None, prepacked: bool = True, engine: str = "torch",
                        encoder: str | None = None) -> "Captioner":
        """Load a Lightning checkpoint (`.ckpt`) or an exported safetensors directory.

        `int8=True` quantizes GPT-2's and the mapper's Linear layers to int8 for CPU inference
        (captioner/quantize.py). `precision="bf16"` (or "fp16") runs CLIP and GPT-2 with 16-bit
        weights: half the memory traffic per token, and on CPUs with AVX512-BF16 or AMX much faster
        batched matmuls (bench/serve_load.py); the mapper stays fp32. `datastore=DIR` replaces a retrieval
        model's datastore (captioner/retrieval.py): another domain's captions, no retraining.
        In fp32 on the CPU, GPT-2's and the mapper's weights are reordered once into oneDNN's layout
        (captioner/prepack.py: same captions, faster decoding); `prepacked=False` keeps them as stored.
        `path` may be a Hub repo id (`user/repo`, read through huggingface_hub's cache; captioner/hub_repo.py);
        `engine="onnx"` runs an export's ONNX graphs in ONNX Runtime instead (captioner/onnx_runtime.py).
        `encoder=FILE` loads that CLIP file instead of the one the checkpoint names: the way to vouch for a
        TorchScript file (it runs code when loaded), which is never loaded on a checkpoint's word alone."""
        dtype_of(precision)  # a wrong name fails before the checkpoint loads
        path = hub_repo.resolve(path)
        if engine == "onnx":
            if int8 or precision != "fp32" or datastore is not None:
                raise ValueError("engine=onnx runs the exported fp32 graphs: drop int8, precision and datastore")
            from captioner.onnx_runtime import OnnxModule

            return cls(OnnxModule(path, device), device)
        if engine != "torch":
            raise ValueError(f"engine={engine!r}: choose torch or onnx")
        module = load_module(path, **({"encoder": encoder} if encoder else {}))
        module.model.merge_adapters()  # LoRA: one plain decoder to quantize, prepack or cast (same logits)
        if datastore is not None:
            from captioner.retrieval import Datastore

            if not hasattr(module, "datastore"):
                raise ValueError(f"datastore={datastore}: {path} was trained without retrieval, so it reads no datastore")
            module.datastore = Datastore.open(datastore)
        if int8:
            if str(device) != "cpu":
                raise ValueError("int8 quantization runs on the CPU only: drop int8 or use device=cpu")
            if precision != "fp32":
                raise ValueError(f"int8 and precision={precision} both set GPT-2's weights: choose one")
            module = quantize.quantize_module(module)
        elif precision != "fp32":
            if precision == "bf16" and str(device) == "cpu" and not native_bf16():
                warnings.warn("this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 matmuls are emulated and may be slower than fp32")
            module.encoder.set_precision(precision)
            module.decoder.to(dtype_of(precision))
        elif prepacked and str(device) == "cpu" and prepack.available():
            prepack.prepack_(module.decoder)  # in place: the checkpoint's module is ours alone (Captioner sets eval mode)
            prepack.prepack_(module.mapper)
        return cls(module, device)

    def pixels(self, images: Iterable[ImageLike]) -> torch.Tensor:
        """Images -> the encoder's input, (B, 3, R, R)."""
        return torch.stack([self.preprocess(to_pil(image)) for image in images])

    @torch.inference_mode()
    def caption_pixels(self, pixels: torch.Tensor, decoding: Decoding | None = None, attention: bool = False) -> list[Caption]:
        """Caption a preprocessed batch (B, 3, R, R) in one forward pass."""
        decoding = decoding or Decoding()
        if decoding.max_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"max_new_tokens={decoding.max_new_tokens} is more than this model's decoder can place after its prefix: "
                f"use at most {self.max_new_tokens}"
            )
        if hasattr(self.module, "describe_features"):  # retrieval: prefix + prompt of the nearest datastore captions
            texts, retrieved = self.module.describe_features({"pixels": pixels.to(self.device)}, decoding)
            return [Caption(t, None, tuple(r)) for t, r in zip(texts, retrieved)]
        model = self.model
        features = model.features({"pixels": pixels.to(self.device)})
        maps = None
        if attention and self.has_attention:
            prefix, weights = model.mapper(features, return_attention=True)  # weights (B, P, N)
            maps = attention_grid(weights.float()).cpu()  # (B, P, g, g)
        else:
            prefix = model.mapper(features)  # (B, P, D)
        texts = model.generate(prefix, decoding)
        return [Caption(t, None if maps is None else maps[i]) for i, t in enumerate(texts)]

    @torch.inference_mode()
    def caption_features(self, batch: dict[str, torch.Tensor], decoding: Decoding | None = None) -> list[str]:
        """Captions for a batch of stored CLIP features (a feature store's `clip_features` or
        `patch_tokens`, as the DataModule serves them): evaluation without re-encoding images."""
        return self.module.caption_features({k: v.to(self.device) for k, v in batch.items()}, decoding or Decoding())

    def describe(self, images, batch_size: int = 16, attention: bool = True, **decoding) -> list[Caption]:
        """Captions with their attention maps (when the mapper has them), one per image."""
        items, _ = _as_list(images)
        options = decoding_from(decoding)
        results: list[Caption] = []
        for start in range(0, len(items), batch_size):
            results += self.caption_pixels(self.pixels(items[start : start + batch_size]), options, attention)
        return results

    def caption(self, images: ImageLike | Sequence[ImageLike], batch_size: int = 16, **decoding) -> str | list[str]:
        """A caption for one image, or a list for a list (or a (B, C, H, W) tensor) of images.

        Decoding options are `captioner.generate.Decoding` fields: strategy=greedy|beam|sample,
        num_beams, length_penalty, temperature, top_k, top_p, max_new_tokens."""
        items, single = _as_list(images)
        texts = [c.text for c in self.describe(items, batch_size=batch_size, attention=False, **decoding)]
        return texts[0] if single else texts
