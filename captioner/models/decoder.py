"""The language model (any transformers causal LM) and its tokenizer: pretrained by name or path, or
built at any size with seeded random weights.

Pretrained: a hub name (`gpt2`, `HuggingFaceTB/SmolLM2-135M`, `Qwen/Qwen2.5-0.5B`, `facebook/opt-125m`)
or a local directory saved by `save_pretrained`, loaded with `AutoModelForCausalLM` / `AutoTokenizer`.
Random: a mapping. `{model_type: llama, hidden_size: 128, ...}` builds that `AutoConfig` architecture;
a mapping without `model_type` is `GPT2Config` fields, optionally `arch: NAME` for a published GPT-2
size (`captioner/models/zoo.py`). The vocabulary comes from the tokenizer unless the mapping sets one.

Special tokens. A caption is tokenised without the tokenizer's own special tokens (`caption_ids`): the
image prefix takes the place of a beginning-of-sequence token, so a target is `prefix caption eos` for
every family, with or without a BOS in its tokenizer. Decoding stops at the tokenizer's `eos_token`;
padding uses `pad_token`, or eos where the tokenizer has none (padded positions are masked and
labelled -100, so their id never matters).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2Tokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from captioner.models.hub import missing, reachable
from captioner.models.zoo import GPT2_ARCHS, resolve
from captioner.scratch import private_dir

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# what save_pretrained writes for a tokenizer, and GPT-2's bare format (vocab.json + merges.txt)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
GPT2_FORMAT = ("vocab.json", "merges.txt")


def _from_hub(loader, name: str, config_key: str, kind: str, required_file: str):
    """Load `name` from the local HF cache, or download it only when the hub answers at once.

    The cache is checked by file: offline, transformers 5 can return an empty tokenizer instead of
    raising, so "loaded" is not proof that the files were there."""
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, required_file), str) and not reachable("huggingface.co"):
        raise missing(kind, name, config_key, "huggingface.co")
    return loader(name)


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """A `save_pretrained` tokenizer directory (any family), a directory with GPT-2's bare
    `vocab.json` + `merges.txt`, or a hub name; pad falls back to eos."""
    path = Path(spec).expanduser()
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    elif all((path / name).is_file() for name in GPT2_FORMAT):
        # transformers 5 ignores vocab_file=/merges_file= and builds an empty tokenizer: pass vocab=/merges=
        tokenizer = GPT2Tokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"))
    elif path.exists():
        raise FileNotFoundError(f"tokenizer directory {path} has neither tokenizer.json / tokenizer_config.json "
                                "(save_pretrained) nor vocab.json + merges.txt (model.tokenizer)")
    else:
        tokenizer = _from_hub(AutoTokenizer.from_pretrained, spec, "model.tokenizer", "tokenizer", "tokenizer_config.json")
    if len(tokenizer) < 2 or tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {spec!r} loaded without an end-of-sequence token ({len(tokenizer)} tokens): check its files")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding positions are masked and labelled -100 anyway
    return tokenizer


def caption_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """A caption's token ids without the tokenizer's special tokens (no BOS: the prefix stands there)."""
    return tokenizer.encode(text, add_special_tokens=False)


def tokenizer_files(spec: str, tokenizer: PreTrainedTokenizerBase) -> dict[str, str | bytes]:
    """The tokenizer's files, to travel inside a checkpoint: read from its directory, or written by
    `save_pretrained` for a hub name. Text files as str, binary ones (SentencePiece) as bytes."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _read_files(path)
    with tempfile.TemporaryDirectory(prefix="captioner-tokenizer-") as temp:
        tokenizer.save_pretrained(temp)
        return _read_files(Path(temp))


def _read_files(path: Path) -> dict[str, str | bytes]:
    files = {}
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            data = (path / name).read_bytes()
            try:
                files[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                files[name] = data
    return files


def write_tokenizer(files: Mapping[str, str | bytes]) -> Path:
    """A directory holding carried tokenizer files (one per content, under this user's temp directory, reused
    only when its files hold exactly this content), so a checkpoint captions wherever it is copied, whether
    or not its training run's data/ still exists."""
    names = sorted(files)
    blobs = [files[n].encode("utf-8") if isinstance(files[n], str) else files[n] for n in names]
    digest = hashlib.sha256(b"\0".join(n.encode() + b"\0" + b for n, b in zip(names, blobs))).hexdigest()[:16]
    directory = private_dir("tokenizers") / digest  # this user's: no one else can plant files there
    if not all((directory / name).is_file() and (directory / name).read_bytes() == blob for name, blob in zip(names, blobs)):
        directory.mkdir(parents=True, exist_ok=True)
        for name, blob in zip(names, blobs):
            temp = directory / f".{name}.{os.getpid()}"
            temp.write_bytes(blob)
            os.replace(temp, directory / name)  # whole files only: another process may read them at once
    return directory


# transformers draws a "Loading weights" bar for every from_pretrained: a second's load is no step to watch
transformers_logging.disable_progress_bar()


def decoder_config(spec: Mapping, vocab_size: int, eos: int):
    """The transformers config a mapping spec describes (see the module docstring)."""
    fields = dict(spec)
    model_type = fields.pop("model_type", None)
    if model_type is None:  # GPT2Config fields, the published sizes by `arch:`
        fields = resolve(fields, GPT2_ARCHS, "model.decoder")
        fields.setdefault("vocab_size", vocab_size)
        return GPT2Config(**fields, bos_token_id=eos, eos_token_id=eos)
    if "arch" in fields:
        raise ValueError("model.decoder: `arch:` names a GPT-2 size; with model_type give the sizes themselves")
    fields.setdefault("vocab_size", vocab_size)
    fields.setdefault("eos_token_id", eos)
    fields.setdefault("bos_token_id", eos)
    try:
        return AutoConfig.for_model(model_type, **fields)
    except ValueError as error:  # an unknown model_type
        raise ValueError(f"model.decoder.model_type={model_type!r}: {error}") from None


def load_decoder(spec: str | Mapping, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """A causal LM: pretrained from a hub name or `save_pretrained` directory, or a mapping built
    with weights drawn from `seed` (without moving the run's random stream)."""
    vocab_size, eos = len(tokenizer), tokenizer.eos_token_id
    if isinstance(spec, Mapping):
        config = decoder_config(spec, vocab_size, eos)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
    elif Path(spec).expanduser().is_dir():
        path = Path(spec).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"decoder directory {path} has no config.json: pass a save_pretrained directory (model.decoder)")
        model = AutoModelForCausalLM.from_pretrained(path)
    else:
        model = _from_hub(AutoModelForCausalLM.from_pretrained, spec, "model.decoder", "language model", "config.json")
    # some class names (GPT2LMHeadModel) name no loss in transformers' LOSS_MAPPING, which then warns on
    # every run that it falls back to the causal-LM loss: say that loss outright (the same loss, no warning)
    model.loss_type = "ForCausalLM"
    if model.get_input_embeddings().num_embeddings < vocab_size:
        raise ValueError(f"decoder {spec!r} has {model.get_input_embeddings().num_embeddings} embeddings "
                         f"but the tokenizer has {vocab_size} tokens")
    return model


def hidden_size(model: PreTrainedModel) -> int:
    """The width of the decoder's input embeddings, whatever its config calls it."""
    return model.get_input_embeddings().embedding_dim


def max_positions(model: PreTrainedModel) -> int | None:
    """How many positions the decoder can read (prefix + caption); None when its config sets no limit."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None
