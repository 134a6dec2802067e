"""Prepacked fp32 inference: every matmul weight in oneDNN's layout, the same numbers and captions."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from captioner import prepack
from captioner.api import Captioner
from captioner.generate import Decoding, generate_ids
from conftest import scenes
from test_generate import DECODINGS, Tokenizer, peaked_gpt2

pytestmark = pytest.mark.skipif(not prepack.available(), reason="this torch build has no oneDNN")


def test_a_packed_layer_computes_what_conv1d_and_linear_compute():
    torch.manual_seed(0)
    conv, linear = Conv1D(24, 16), nn.Linear(16, 24)
    nn.init.normal_(conv.bias)
    for layer in (conv, linear):
        fast = prepack.packed(layer)
        for x in (torch.randn(1, 16), torch.randn(1, 1, 16), torch.randn(5, 16), torch.randn(3, 7, 16)):  # one row, a step of beams, a prefix
            with torch.no_grad():
                assert torch.allclose(fast(x), layer(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fp32 weights on the CPU"):
        prepack.PackedLinear(torch.zeros(4, 4, dtype=torch.bfloat16), None)


@pytest.mark.parametrize("decoding", DECODINGS, ids=lambda d: f"{d.strategy}{d.num_beams if d.strategy == 'beam' else ''}-lp{d.length_penalty}")
def test_a_prepacked_gpt2_writes_the_same_tokens(decoding):
    model = peaked_gpt2(1, 2.0)
    fast = prepack.prepack_(peaked_gpt2(1, 2.0))
    assert not any(isinstance(m, (Conv1D, nn.Linear)) for m in fast.modules())  # the lm_head too
    assert isinstance(fast.lm_head, prepack.PackedLinear) and isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    prefix = torch.randn(8, 5, 32) * 3  # (B, P, D)
    assert generate_ids(fast, Tokenizer, prefix, decoding) == generate_ids(model, Tokenizer, prefix, decoding)
    assert generate_ids(fast, Tokenizer, prefix[:1], decoding) == generate_ids(model, Tokenizer, prefix[:1], decoding)  # greedy: one row


def test_captioner_prepacks_fp32_on_the_cpu_and_captions_alike(distinct_ckpt):
    fast, plain = Captioner.from_pretrained(distinct_ckpt), Captioner.from_pretrained(distinct_ckpt, prepacked=False)
    blocks = fast.module.decoder.transformer.h[0]
    assert isinstance(blocks.attn.c_attn, prepack.PackedLinear) and isinstance(blocks.mlp.c_proj, prepack.PackedLinear)
    assert isinstance(plain.module.decoder.transformer.h[0].attn.c_attn, Conv1D)
    assert not any(isinstance(m, prepack.PackedLinear) for m in Captioner.from_pretrained(distinct_ckpt, int8=True).module.modules())
    images = scenes("large red circle", "large blue square left", "row of three", "green above red")
    for decoding in (Decoding("greedy"), Decoding("beam", num_beams=3)):
        assert fast.caption(images, **vars(decoding)) == plain.caption(images, **vars(decoding))


def test_prepack_module_copies_decoder_and_mapper_only(smoke_cfg):
    from hydra.utils import instantiate

    cfg = smoke_cfg()
    instantiate(cfg.data).prepare_data()  # writes the embedded tokenizer
    module = instantiate(cfg.model).eval()
    fast = prepack.prepack_module(module)
    assert fast.encoder is module.encoder and fast.decoder is not module.decoder and fast.mapper is not module.mapper
    assert isinstance(module.decoder.transformer.h[0].attn.c_attn, Conv1D)  # the original is untouched
    features = {"patch_tokens": torch.randn(2, module.encoder.num_tokens, module.encoder.token_dim), "clip_features": torch.randn(2, module.encoder.embed_dim)}
    with torch.inference_mode():
        assert torch.allclose(fast.prefix(features), module.prefix(features), atol=1e-4)
        assert fast.caption_features(features, Decoding(max_new_tokens=5)) == module.caption_features(features, Decoding(max_new_tokens=5))
    with pytest.raises(ValueError, match="fp32 model on the CPU"):
        prepack.prepack_module(module.to(torch.bfloat16))
