"""GPT-2 (transformers) and its tokenizer: pretrained by name or path, or built at any size.

Pretrained: `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `distilgpt2` (any hub name) or a local
directory saved by `save_pretrained`. Random: a mapping of `GPT2Config` fields, optionally
`arch: NAME` for a published size (`captioner/models/zoo.py`). Freezing is the module's choice
(`freeze_decoder`): no gradient, out of the optimizer, eval mode.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from captioner.models.hub import missing, reachable
from captioner.models.zoo import GPT2_ARCHS, resolve

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _from_hub(loader, name: str, config_key: str, kind: str, required_file: str):
    """Load `name` from the local HF cache, or download it only when the hub answers at once.

    The cache is checked by file: offline, transformers 5 can return an empty tokenizer instead of
    raising, so "loaded" is not proof that the files were there."""
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, required_file), str) and not reachable("huggingface.co"):
        raise missing(kind, name, config_key, "huggingface.co")
    return loader(name)


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """A directory with GPT-2's `vocab.json` + `merges.txt`, or a hub name such as `gpt2`."""
    path = Path(spec).expanduser()
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        # transformers 5 ignores vocab_file=/merges_file= and builds an empty tokenizer: pass vocab=/merges=
        tokenizer = GPT2Tokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"))
    elif path.exists():
        raise FileNotFoundError(f"tokenizer directory {path} needs vocab.json and merges.txt (model.tokenizer)")
    else:
        tokenizer = _from_hub(GPT2Tokenizer.from_pretrained, spec, "model.tokenizer", "GPT-2 tokenizer", "vocab.json")
    if len(tokenizer) < 2 or tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {spec!r} loaded empty ({len(tokenizer)} tokens): check its files")
    tokenizer.pad_token = tokenizer.eos_token  # padding positions are masked and labelled -100 anyway
    return tokenizer


TOKENIZER_FILES = ("vocab.json", "merges.txt")


def tokenizer_files(spec: str, tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """The tokenizer's `vocab.json` and `merges.txt` as text, to travel inside a checkpoint: read from
    its directory, or written out by the tokenizer itself for a hub name."""
    path = Path(spec).expanduser()
    if not all((path / name).is_file() for name in TOKENIZER_FILES):
        path = Path(tempfile.mkdtemp(prefix="captioner-tokenizer-"))
        tokenizer.save_vocabulary(str(path))
    return {name: (path / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES}


def write_tokenizer(files: dict[str, str]) -> Path:
    """A directory holding carried tokenizer files (one per content, under the temp directory), so a
    checkpoint captions wherever it is copied, whether or not its training run's data/ still exists."""
    digest = hashlib.sha256("\0".join(files[name] for name in TOKENIZER_FILES).encode()).hexdigest()[:16]
    directory = Path(tempfile.gettempdir()) / "captioner-tokenizers" / digest
    if not all((directory / name).is_file() for name in TOKENIZER_FILES):
        directory.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            temp = directory / f".{name}.{os.getpid()}"
            temp.write_text(files[name], encoding="utf-8")
            os.replace(temp, directory / name)  # whole files only: another process may read them at once
    return directory


# transformers draws a "Loading weights" bar for every from_pretrained: a second's load is no step to watch
transformers_logging.disable_progress_bar()


def load_gpt2(spec: str | Mapping, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> GPT2LMHeadModel:
    """A string loads pretrained GPT-2 (`gpt2`, `distilgpt2`, ... or a local directory); a mapping of
    `GPT2Config` fields builds that architecture with seeded random weights and the tokenizer's vocabulary
    (`arch: gpt2-medium` starts from a published size, GPT-2's 50257-token vocabulary included)."""
    vocab_size, eos = len(tokenizer), tokenizer.eos_token_id
    if isinstance(spec, Mapping):
        fields = resolve(spec, GPT2_ARCHS, "model.decoder")
        fields.setdefault("vocab_size", vocab_size)  # the tokenizer's, unless the spec or its arch sets one
        with torch.random.fork_rng(devices=[]):  # seeded weights without moving the run's random stream
            torch.manual_seed(seed)
            model = GPT2LMHeadModel(GPT2Config(**fields, bos_token_id=eos, eos_token_id=eos))
    elif Path(spec).expanduser().is_dir():
        model = GPT2LMHeadModel.from_pretrained(Path(spec).expanduser())
    else:
        model = _from_hub(GPT2LMHeadModel.from_pretrained, spec, "model.decoder", "GPT-2", "config.json")
    # GPT2LMHeadModel's class name names no loss in transformers' LOSS_MAPPING, which then warns on every
    # run that it falls back to the causal-LM loss: say that loss outright (the same loss, no warning)
    model.loss_type = "ForCausalLM"
    if model.config.vocab_size < vocab_size:
        raise ValueError(f"decoder {spec!r} has {model.config.vocab_size} embeddings but the tokenizer has {vocab_size} tokens")
    return model
