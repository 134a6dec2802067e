"""Any causal LM as the decoder: GPT-2, Llama, Qwen2 and OPT at tiny random size, saved as a user has
them (`save_pretrained` model and tokenizer directories, the tokenizer a BPE trained on captions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from captioner.generate import Decoding, generate_ids
from captioner.models.decoder import caption_ids, load_decoder, load_tokenizer

CAPTIONS = [
    "a red circle on the left", "two blue squares at the top", "a green triangle in the middle",
    "a small yellow star beside a purple ring", "three orange crosses in a row", "an empty white image",
] * 4

# each family's tiny architecture and its tokenizer's special tokens (bos_prepended: encode() adds BOS);
# weights drawn 15x wider than the default, so that attention is sharp and positions change the tokens
SHARP = {"initializer_range": 0.3}
FAMILIES = {
    "gpt2": ({"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, **SHARP},
             {"eos": "<|endoftext|>"}),
    "llama": ({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, **SHARP},
              {"bos": "<s>", "eos": "</s>", "bos_prepended": True}),
    "qwen2": ({"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": True, **SHARP},
              {"eos": "<|endoftext|>", "pad": "<|endoftext|>"}),
    "opt": ({"model_type": "opt", "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "max_position_embeddings": 64, "word_embed_proj_dim": 32, **SHARP},
            {"bos": "</s>", "eos": "</s>", "pad": "<pad>", "bos_prepended": True}),
}


def save_tokenizer(out: Path, special: dict) -> Path:
    """A byte-level BPE trained on CAPTIONS, saved by PreTrainedTokenizerFast.save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    names = [special[k] for k in ("bos", "eos", "pad") if special.get(k)]
    specials = list(dict.fromkeys(names))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CAPTIONS, trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if special.get("bos_prepended"):
        bos = special["bos"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special.get("bos"), eos_token=special["eos"],
                                   pad_token=special.get("pad"))
    fast.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family -> (decoder directory, tokenizer directory), both written by save_pretrained."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("language_models")
    out = {}
    for family, (arch, special) in FAMILIES.items():
        tokenizer_dir = save_tokenizer(root / f"{family}-tokenizer", special)
        tokenizer = load_tokenizer(str(tokenizer_dir))
        fields = {k: v for k, v in arch.items() if k != "model_type"}
        config = AutoConfig.for_model(arch["model_type"], vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                      bos_token_id=tokenizer.bos_token_id or tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, **fields)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(str(root / family))
        out[family] = (root / family, tokenizer_dir)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_captions_are_tokenised_without_bos_and_end_with_eos(family, saved):
    from captioner.data.coco import ImageRecord
    from captioner.data.dataset import tokenize

    tokenizer = load_tokenizer(str(saved[family][1]))
    text = "a red circle on the left"
    if FAMILIES[family][1].get("bos_prepended"):  # the tokenizer itself would put BOS first
        assert tokenizer.encode(text)[0] == tokenizer.bos_token_id
    [[ids]] = tokenize([ImageRecord(image_id=1, path=Path("x.png"), captions=[text])], tokenizer, 30)
    assert ids == caption_ids(tokenizer, text) + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids[:-1], skip_special_tokens=False) == text  # no BOS (nor anything else) before the caption


@pytest.mark.parametrize("family", FAMILIES)
def test_a_mapping_with_model_type_builds_that_architecture_from_the_seed(family, saved):
    tokenizer = load_tokenizer(str(saved[family][1]))
    arch = FAMILIES[family][0]
    model = load_decoder(arch, tokenizer, seed=3)
    assert model.config.model_type == arch["model_type"] and model.get_input_embeddings().num_embeddings == len(tokenizer)
    again = load_decoder(arch, tokenizer, seed=3)
    other = load_decoder(arch, tokenizer, seed=4)
    first = next(iter(model.state_dict()))
    assert torch.equal(model.state_dict()[first], again.state_dict()[first])
    assert not torch.equal(model.state_dict()[first], other.state_dict()[first])


def test_unknown_model_type_and_missing_directories_are_one_clear_line(tmp_path):
    tokenizer = load_tokenizer(str(save_tokenizer(tmp_path / "tok", FAMILIES["gpt2"][1])))
    with pytest.raises(ValueError, match="model.decoder.model_type='nope'"):
        load_decoder({"model_type": "nope"}, tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_decoder(str(tmp_path / "empty"), tokenizer)
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))
    from captioner.models.hub import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="model.decoder=/path/to/HuggingFaceTB-SmolLM2-135M"):
        load_decoder("HuggingFaceTB/SmolLM2-135M", tokenizer)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_our_decode_loop_equals_transformers_generate(family, strategy, saved):
    """Token for token, with the preallocated and the dynamic cache (rotary models included)."""
    decoder_dir, tokenizer_dir = saved[family]
    tokenizer = load_tokenizer(str(tokenizer_dir))
    decoder = load_decoder(str(decoder_dir), tokenizer).eval()
    torch.manual_seed(1)
    prefix = torch.randn(3, 4, decoder.get_input_embeddings().embedding_dim)
    options = {"strategy": strategy, "num_beams": 3, "max_new_tokens": 12}
    reference = generate_ids(decoder, tokenizer, prefix, Decoding(**options, engine="hf"))
    assert any(len(row) > 2 for row in reference)
    for cache in ("preallocated", "dynamic"):
        assert generate_ids(decoder, tokenizer, prefix, Decoding(**options, kv_cache=cache)) == reference, cache


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_and_prepacked_decoders_caption_every_family(family, saved):
    from captioner import prepack, quantize

    tokenizer = load_tokenizer(str(saved[family][1]))
    decoder = load_decoder(str(saved[family][0]), tokenizer).eval()
    torch.manual_seed(2)
    prefix = torch.randn(2, 4, decoder.get_input_embeddings().embedding_dim)
    decoding = Decoding(strategy="beam", num_beams=3, max_new_tokens=8)
    plain = generate_ids(decoder, tokenizer, prefix, decoding)
    int8 = quantize.quantize(decoder)
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in int8.modules())
    assert all(len(row) <= 8 for row in generate_ids(int8, tokenizer, prefix, decoding))
    if prepack.available():
        import copy

        packed = prepack.prepack_(copy.deepcopy(decoder))
        assert any(isinstance(m, prepack.PackedLinear) for m in packed.modules())
        assert generate_ids(packed, tokenizer, prefix, decoding) == plain


@pytest.mark.java
@pytest.mark.parametrize("family", FAMILIES)
def test_train_evaluate_export_caption_and_serve(family, saved, smoke_cfg, tmp_path):
    """The whole path for each family: smoke training, evaluation, export, the CLI's API and one request."""
    from fastapi.testclient import TestClient

    from captioner.api import Captioner
    from captioner.evaluate import run as evaluate
    from captioner.export import export
    from captioner.train import run as train
    from captioner.web.app import Limits, create_app
    from conftest import scenes
    from test_evaluate import compose_eval

    import shutil

    decoder_dir, tokenizer_dir = (shutil.copytree(d, tmp_path / d.name) for d in saved[family])
    cfg = smoke_cfg("score=false", f"model.decoder={decoder_dir}", f"model.tokenizer={tokenizer_dir}", "pretrain.lm=null")
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = tmp_path / "eval"
    evaluate(compose_eval(out, [f"ckpt_path={ckpt}", "meteor=false", "decoding.strategy=beam", "decoding.max_new_tokens=8"]))
    assert len(json.loads((out / "captions_test.json").read_text())) == 16

    shutil.rmtree(decoder_dir), shutil.rmtree(tokenizer_dir)  # the checkpoint carries the decoder's config and the tokenizer

    exported = export(ckpt, tmp_path / "export")
    assert (exported / "tokenizer" / "tokenizer.json").is_file() and (exported / "tokenizer" / "tokenizer_config.json").is_file()
    captioner = Captioner.from_pretrained(exported)
    assert captioner.model.decoder.config.model_type == FAMILIES[family][0]["model_type"]
    images = scenes("large red circle", "row of three")
    direct = Captioner.from_pretrained(ckpt).caption(images, max_new_tokens=8)
    assert captioner.caption(images, max_new_tokens=8) == direct and all(isinstance(c, str) for c in direct)

    import io

    buffer = io.BytesIO()
    images[0].save(buffer, format="PNG")
    with TestClient(create_app(captioner, Limits())) as client:
        response = client.post("/v1/captions", files={"images": ("a.png", buffer.getvalue(), "image/png")}, params={"max_new_tokens": 8})
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["caption"] == direct[0]
