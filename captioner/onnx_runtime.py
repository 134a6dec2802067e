"""ONNX Runtime inference of an export's graphs (captioner/onnx_graphs.py), decoded by captioner/generate.py.

    Captioner.from_pretrained("export/", engine="onnx").caption("photo.jpg", strategy="beam", num_beams=3)

`OnnxModule` stands where the API holds a CaptionModule: `features` runs encoder.onnx, `mapper` runs
mapper.onnx, and `decoder` (`OrtDecoder`) answers the two calls captioner/generate.py makes of a decoder
(a prefill on the prefix embeddings, a step on one token per row) by running the prefill and step graphs
and writing their keys and values into generate's own cache. So greedy, beam and sampled decoding are
generate.py's loops, beam bookkeeping and cache reordering included, with every `Decoding` option; only
`engine="hf"` (transformers' generate) has no ONNX form.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from lightning.fabric.utilities.data import AttributeDict

from captioner.generate import generate
from captioner.models.decoder import load_tokenizer
from captioner.onnx_graphs import FOLDER, MANIFEST

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def _session(path: Path, device: str, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=PROVIDERS[device])


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).contiguous().numpy() if x.is_floating_point() else x.detach().cpu().contiguous().numpy()


class OrtDecoder:
    """The decoder calls captioner/generate.py makes, answered by ONNX Runtime; the cache stays generate's."""

    dtype = torch.float32  # the graphs are fp32

    def __init__(self, prefill, step, max_positions: int):
        self.prefill, self.step = prefill, step
        self.config = SimpleNamespace(n_positions=max_positions)

    def modules(self):  # no PyTorch layers (the API looks for int8 ones)
        return iter(())

    def __call__(self, *, cache, inputs_embeds: torch.Tensor | None = None, input_ids: torch.Tensor | None = None, **_):
        if inputs_embeds is not None:  # the prefill: (B, P, D) -> logits of the next token
            logits, keys, values = self.prefill.run(None, {"prefix": _numpy(inputs_embeds)})
        else:  # a step: one token per row at the position after the cache's last
            rows, past = input_ids.shape[0], cache.get_seq_length()
            feed = {"tokens": _numpy(input_ids), "positions": np.full((rows, 1), past, dtype=np.int64),
                    "past_keys": _numpy(torch.stack([layer.keys for layer in cache.layers])),  # (layers, N, H, T, d)
                    "past_values": _numpy(torch.stack([layer.values for layer in cache.layers]))}
            logits, keys, values = self.step.run(None, feed)
        for i in range(keys.shape[0]):  # generate's cache keeps them: its beam reordering applies as it does for PyTorch
            cache.update(torch.from_numpy(keys[i]), torch.from_numpy(values[i]), i)
        return SimpleNamespace(logits=torch.from_numpy(logits)[:, None])  # (N, 1, V), as logits_to_keep=1 gives

    def generate(self, *args, **kwargs):
        raise ValueError("decoding engine 'hf' is transformers' generate, which needs the PyTorch decoder: use engine=cached with ONNX Runtime")


class OnnxGraphs:
    """The four graphs of an `onnx/` folder in ONNX Runtime sessions: `features`, `mapper`, `decoder`."""

    def __init__(self, folder: str | Path, device: str = "cpu", threads: int | None = None):
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise FileNotFoundError(f"{folder.parent} holds no ONNX graphs ({FOLDER}/{MANIFEST}): export with "
                                    f"`python -m captioner.export ckpt=... out={folder.parent} onnx=true`")
        if str(device) not in PROVIDERS:
            raise ValueError(f"engine=onnx runs on {sorted(PROVIDERS)}, not {device!r}")
        self.manifest = json.loads((folder / MANIFEST).read_text())
        sessions = {name: _session(folder / file, str(device), threads) for name, file in self.manifest["graphs"].items()}
        self._encoder, self._mapper = sessions["encoder"], sessions["mapper"]
        self.decoder = OrtDecoder(sessions["decoder_prefill"], sessions["decoder_step"], self.manifest["max_positions"])
        self.mapper = self._map

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.from_numpy(self._encoder.run(None, {"pixels": _numpy(batch["pixels"])})[0])

    def _map(self, features: torch.Tensor, return_attention: bool = False) -> torch.Tensor:
        return torch.from_numpy(self._mapper.run(None, {"features": _numpy(features)})[0])  # (B, P, D)


class OnnxModule(OnnxGraphs):
    """What the API reads of a CaptionModule, from an export directory's ONNX graphs, config and tokenizer."""

    def __init__(self, directory: str | Path, device: str = "cpu", threads: int | None = None):
        directory = Path(directory)
        super().__init__(directory / FOLDER, device, threads)
        self.tokenizer = load_tokenizer(str(directory / "tokenizer"))
        self.hparams = AttributeDict(json.loads((directory / "config.json").read_text())["hyper_parameters"])
        import clip

        resolution = self.manifest["resolution"]
        self.encoder = SimpleNamespace(resolution=resolution, preprocess=clip.clip._transform(resolution))  # CLIP's, as ClipEncoder's
        self.model = self  # the API's model core too: features, mapper, decoder and generate
        self.max_new_tokens = self.manifest["max_positions"] - int(self.hparams["prefix_length"])

    def generate(self, prefix: torch.Tensor, decoding=None) -> list[str]:
        """Captions for prefixes (B, P, D): generate.py's decode loops over the ONNX Runtime decoder."""
        return generate(self.decoder, self.tokenizer, prefix, decoding)

    def to(self, device) -> "OnnxModule":  # the sessions were placed when they were made
        return self

    def eval(self) -> "OnnxModule":
        return self
