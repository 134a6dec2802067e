"""The embedded default's decoder pretraining: GPT-2 by default, a Llama-style model by one switch."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaForCausalLM

from captioner.data.synthetic import write_dataset
from captioner.models.decoder import load_decoder, load_tokenizer
from captioner.pretraining import build_lm, build_tokenizer
from conftest import compose_train

# the embedded default's GPT-2: the fields its pretraining cache (manifest.json) was built from
DEFAULT_GPT2 = {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 64, "activation_function": "gelu",
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def test_gpt2_stays_the_default_and_pretrain_lm_llama_switches_the_decoder(tmp_path, data_dir):
    from omegaconf import OmegaConf

    default = compose_train(tmp_path / "run", data_dir)
    lm = OmegaConf.to_container(default.pretrain.lm, resolve=True)
    assert lm["arch"] == DEFAULT_GPT2  # the GPT-2 cache key is what it was: no rebuild, same weights
    assert lm["out"].endswith("/pretrained/gpt2") and default.model.decoder == lm["out"]

    llama = compose_train(tmp_path / "run", data_dir, ["pretrain/lm=llama"])
    arch = OmegaConf.to_container(llama.pretrain.lm.arch)
    assert arch["model_type"] == "llama" and arch["hidden_size"] == DEFAULT_GPT2["n_embd"]
    assert not set(arch) & set(DEFAULT_GPT2)  # no GPT-2 field is left over in the Llama config
    assert llama.model.decoder == llama.pretrain.lm.out != default.pretrain.lm.out  # its own cache
    settings = {k: v for k, v in lm.items() if k not in ("arch", "out")}  # steps, lr, data: shared
    assert {k: llama.pretrain.lm[k] for k in settings} == {k: default.pretrain.lm[k] for k in settings}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("world"), seed=3, sizes={"train": 300, "val": 40})
    split = lambda s: {"format": "coco", "annotations": str(root / "annotations" / f"captions_{s}.json"),  # noqa: E731
                       "images": str(root / "images" / s)}
    return split("train"), split("val")


def test_a_llama_style_decoder_pretrains_on_the_captioner_bpe_with_end_of_text_as_bos_eos_and_pad(world, tmp_path):
    from omegaconf import OmegaConf

    from conftest import CONF

    train, val = world
    tokenizer_dir = build_tokenizer(tmp_path / "tokenizer", train, vocab_size=300)
    tokenizer = load_tokenizer(str(tokenizer_dir))
    arch = {**OmegaConf.to_container(OmegaConf.load(CONF / "pretrain" / "lm" / "llama.yaml")["arch"]),
            "hidden_size": 32, "intermediate_size": 86, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 16}  # shorter than two captions: the context must grow to hold them
    out = build_lm(tmp_path / "llama", train, tokenizer_dir, arch, val=val, steps=30, batch_size=32, lr=3e-3,
                   warmup_steps=3, captions_per_text=2, val_every=None)
    losses = [float(r.split(",")[1]) for r in (out / "logs" / "metrics.csv").read_text().splitlines()[1:] if r.split(",")[1]]
    assert losses[-1] < losses[0] * 0.9, losses  # it learns the captions' language

    model = load_decoder(str(out), tokenizer)
    assert isinstance(model, LlamaForCausalLM)  # RMSNorm, rotary positions, SwiGLU
    config = json.loads((out / "config.json").read_text())
    eos = tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(eos) == "<|endoftext|>" and tokenizer.bos_token_id in (None, eos)
    assert config["bos_token_id"] == config["eos_token_id"] == tokenizer.pad_token_id == eos
    assert config["vocab_size"] == len(tokenizer) and config["tie_word_embeddings"] is True
    assert config["max_position_embeddings"] > 16 and "n_positions" not in config  # grown for the longest text
    assert json.loads((out / "manifest.json").read_text())["arch"] == arch  # the cache key is the settings given

    # a text is end-of-text, the captions, each ended by end-of-text: no BOS of the tokenizer's own
    ids = tokenizer("a red circle", add_special_tokens=True)["input_ids"]
    assert eos not in ids and ids == tokenizer.encode("a red circle", add_special_tokens=False)
