"""Decoding: our cached loop equals transformers' generate token for token; int8 stays close to fp32."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from captioner.generate import Decoding, decoding_from, generate, generate_ids
from captioner.quantize import linear_from_conv1d, quantize, quantize_module

EOS = 3


class Tokenizer:
    eos_token_id = EOS

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids if i != EOS)


def peaked_gpt2(seed: int, eos_pull: float) -> GPT2LMHeadModel:
    """A tiny random GPT-2 with confident next-token choices (no near-ties between beams) that
    says end-of-text at varied steps: ln_f's bias is pulled toward the end-of-text embedding."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=12, n_layer=2, n_embd=32, n_head=2, n_positions=64, eos_token_id=EOS, bos_token_id=EOS)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(8)
        direction = torch.randn(32)
        model.transformer.ln_f.bias.copy_(direction)
        model.transformer.wte.weight[EOS] += eos_pull * direction / direction.norm() ** 2
    return model


DECODINGS = [
    Decoding("greedy", max_new_tokens=15),
    Decoding("beam", num_beams=4, max_new_tokens=15),
    Decoding("beam", num_beams=3, length_penalty=2.0, max_new_tokens=12),
    Decoding("beam", num_beams=3, length_penalty=0.5, max_new_tokens=12, min_new_tokens=2),
]


@pytest.mark.parametrize("seed,eos_pull", [(1, 2.0), (3, 4.0)])
@pytest.mark.parametrize("decoding", DECODINGS, ids=lambda d: f"{d.strategy}{d.num_beams if d.strategy == 'beam' else ''}-lp{d.length_penalty}-min{d.min_new_tokens}")
def test_cached_loop_equals_hf_generate(seed, eos_pull, decoding):
    torch.manual_seed(seed + 100)
    model, prefix = peaked_gpt2(seed, eos_pull), torch.randn(8, 5, 32) * 3  # (B, P, D)
    ours = generate_ids(model, Tokenizer, prefix, decoding)
    reference = generate_ids(model, Tokenizer, prefix, dataclasses.replace(decoding, engine="hf"))
    assert ours == reference
    assert all(EOS not in row and len(row) <= decoding.max_new_tokens for row in ours)
    assert all(len(row) >= decoding.min_new_tokens for row in ours)


def test_the_parity_cases_stop_at_end_of_text_at_varied_lengths():
    model, prefix = peaked_gpt2(3, 4.0), torch.randn(8, 5, 32) * 3
    lengths = {len(row) for row in generate_ids(model, Tokenizer, prefix, Decoding("beam", num_beams=3, max_new_tokens=12))}
    assert len(lengths) >= 3 and max(lengths) < 12  # captions end early, and not all at once


@pytest.mark.parametrize("decoding", [Decoding("greedy", max_new_tokens=10), Decoding("beam", num_beams=3, max_new_tokens=10)], ids=["greedy", "beam"])
def test_greedy_and_beam_are_deterministic(decoding):
    prefix = torch.randn(6, 5, 32) * 3
    first = generate_ids(peaked_gpt2(1, 2.0), Tokenizer, prefix, decoding)
    torch.manual_seed(12345)  # the global generator must not matter
    second = generate_ids(peaked_gpt2(1, 2.0), Tokenizer, prefix, decoding)
    assert first == second


def test_batching_does_not_change_captions():
    model, prefix = peaked_gpt2(1, 2.0), torch.randn(6, 5, 32) * 3
    for decoding in (Decoding("greedy", max_new_tokens=10), Decoding("beam", num_beams=3, max_new_tokens=10)):
        together = generate_ids(model, Tokenizer, prefix, decoding)
        alone = [generate_ids(model, Tokenizer, prefix[i : i + 1], decoding)[0] for i in range(6)]
        assert together == alone


def test_sampling_is_seeded_and_filtered():
    model, prefix = peaked_gpt2(1, 0.0), torch.randn(6, 5, 32)
    warm = Decoding("sample", temperature=3.0, max_new_tokens=10, seed=7)
    assert generate_ids(model, Tokenizer, prefix, warm) == generate_ids(model, Tokenizer, prefix, warm)
    assert generate_ids(model, Tokenizer, prefix, warm) != generate_ids(model, Tokenizer, prefix, dataclasses.replace(warm, seed=8))
    greedy = generate_ids(model, Tokenizer, prefix, Decoding("greedy", max_new_tokens=10))
    assert generate_ids(model, Tokenizer, prefix, dataclasses.replace(warm, top_k=1)) == greedy
    assert generate_ids(model, Tokenizer, prefix, dataclasses.replace(warm, top_p=1e-6)) == greedy


def test_generate_decodes_text_and_rejects_bad_options():
    model, prefix = peaked_gpt2(1, 2.0), torch.randn(2, 5, 32) * 3
    texts = generate(model, Tokenizer(), prefix, Decoding(max_new_tokens=5))
    ids = generate_ids(model, Tokenizer, prefix, Decoding(max_new_tokens=5))
    assert texts == [" ".join(f"w{i}" for i in row) for row in ids]
    with pytest.raises(ValueError, match="not one of greedy, beam, sample"):
        Decoding("nucleus")
    with pytest.raises(ValueError, match="unknown decoding option"):
        decoding_from({"beams": 3})
    with pytest.raises(ValueError, match="min_new_tokens"):
        Decoding(max_new_tokens=5, min_new_tokens=6)
    with pytest.raises(ValueError, match=r"prefix must be \(batch"):
        generate_ids(model, Tokenizer, prefix[0], Decoding())


def test_conv1d_becomes_the_equal_linear():
    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # 16 in, 24 out
    nn.init.normal_(conv.bias)
    x = torch.randn(3, 7, 16)
    assert torch.allclose(linear_from_conv1d(conv)(x), conv(x), atol=1e-6)


def test_int8_decoder_has_no_fp32_matmuls_left_and_stays_close():
    model = peaked_gpt2(1, 2.0)
    int8 = quantize(model)
    assert not any(isinstance(m, (Conv1D, nn.Linear)) for m in int8.modules())  # every matmul weight is int8
    assert any(isinstance(m, Conv1D) for m in model.modules())  # the fp32 model is untouched
    ids = torch.randint(0, 12, (4, 9))
    with torch.no_grad():
        fp32_logits, int8_logits = model(ids).logits, int8(ids).logits
    assert (int8_logits - fp32_logits).abs().max() < 0.05 * fp32_logits.abs().max()
    assert (int8_logits.argmax(-1) == fp32_logits.argmax(-1)).float().mean() > 0.9


def test_the_output_projection_is_fp16_and_the_blocks_int8():
    int8 = quantize(peaked_gpt2(1, 2.0))
    assert int8.lm_head._packed_params.dtype == torch.float16  # the layer that picks the token keeps more precision
    assert int8.transformer.h[0].attn.c_attn._packed_params.dtype == torch.qint8
    assert int8.transformer.h[1].mlp.c_proj._packed_params.dtype == torch.qint8


@pytest.mark.parametrize("decoding", DECODINGS[:3], ids=["greedy", "beam4", "beam3-lp2"])
def test_preallocated_cache_gives_the_dynamic_caches_tokens(decoding):
    torch.manual_seed(7)
    model, prefix = peaked_gpt2(3, 4.0), torch.randn(8, 5, 32) * 3
    preallocated = generate_ids(model, Tokenizer, prefix, decoding)
    dynamic = generate_ids(model, Tokenizer, prefix, dataclasses.replace(decoding, kv_cache="dynamic"))
    assert preallocated == dynamic
    assert len({len(row) for row in preallocated}) >= 2  # captions of several lengths: beams were reordered and finished


def test_preallocated_cache_writes_in_place_and_reorders_by_swapping():
    from captioner.generate import preallocated_cache

    cache = preallocated_cache(capacity=6)
    k = torch.arange(2 * 1 * 3 * 2, dtype=torch.float).view(2, 1, 3, 2)  # (N, H, T, d)
    keys, _ = cache.update(k, k + 100, 0)
    assert torch.equal(keys, k) and cache.get_seq_length() == 3
    buffer = cache.layers[0]._k
    keys, _ = cache.update(k[:, :, :1] * -1, k[:, :, :1], 0)
    assert cache.layers[0]._k is buffer and keys.shape[2] == 4  # no new buffer for a step
    cache.reorder_cache(torch.tensor([1, 1]))
    assert torch.equal(cache.layers[0].keys[0], cache.layers[0].keys[1]) and torch.equal(cache.layers[0].keys[0, :, :3], k[1])
    with pytest.raises(ValueError, match="holds 6 positions"):
        cache.update(torch.zeros(2, 1, 3, 2), torch.zeros(2, 1, 3, 2), 0)


def test_quantize_module_swaps_decoder_and_mapper_only(smoke_cfg):
    from hydra.utils import instantiate

    cfg = smoke_cfg()
    instantiate(cfg.data).prepare_data()  # writes the embedded tokenizer
    module = instantiate(cfg.model)
    int8 = quantize_module(module)
    assert int8.encoder is module.encoder and int8.tokenizer is module.tokenizer
    assert int8.decoder is not module.decoder and int8.mapper is not module.mapper
    assert isinstance(module.decoder.transformer.h[0].attn.c_attn, Conv1D)  # the original keeps fp32
    features = {"patch_tokens": torch.randn(2, module.encoder.num_tokens, module.encoder.token_dim), "clip_features": torch.randn(2, module.encoder.embed_dim)}
    with torch.no_grad():
        assert torch.allclose(int8.prefix(features), module.prefix(features), atol=0.1)
    assert len(int8.caption_features(features, Decoding(max_new_tokens=5))) == 2


def test_the_default_decoding_has_one_definition(tmp_path, data_dir):
    """The configs and the CLI take Decoding's defaults; evaluation changes only the strategy."""
    import dataclasses

    from captioner.caption import parse_args
    from captioner.generate import decoding_from
    from conftest import compose_train
    from test_evaluate import compose_eval

    beam = dataclasses.replace(Decoding(), strategy="beam")
    assert decoding_from(compose_train(tmp_path / "run", data_dir).test_decoding) == beam
    assert decoding_from(compose_eval(tmp_path / "eval", []).decoding) == beam
    assert decoding_from(compose_train(tmp_path / "run", data_dir).model.val_decoding) == Decoding()
    args = parse_args(["x.png", "--ckpt", "m.ckpt"])
    assert (args.strategy, args.num_beams, args.max_new_tokens) == (None, None, None)  # left to Decoding
