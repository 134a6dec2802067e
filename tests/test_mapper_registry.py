"""The mapper registry and the bridges: each class registers itself with what it reads and whether it
returns attention maps; `build_mapper` names none; the new bridges compute what LLaVA's and nanoVLM's do."""

from __future__ import annotations

import inspect

import pytest
import torch
import yaml
from torch import nn

from captioner.models import registry
from captioner.models.bridges import PixelShuffleMapper, TokenMLPMapper, pixel_shuffle
from captioner.models.registry import MAPPERS, Mapper, build_mapper
from conftest import CONF, compose_train

DIMS = dict(feature_dim=32, token_dim=24, num_tokens=16, embed_dim=40, prefix_length=5)  # a 4x4 patch grid

# name -> (what it reads, returns maps, prefix length for DIMS)
EXPECTED = {
    "mlp": ("clip_features", False, 5),
    "transformer": ("clip_features", False, 5),
    "attention": ("patch_tokens", True, 5),
    "mlp2x_gelu": ("patch_tokens", False, 16),  # one embedding per patch token
    "pixel_shuffle": ("patch_tokens", False, 4),  # one per 2x2 block
}


def test_the_registry_holds_every_mapper_with_its_declared_capabilities():
    assert {name: (cls.input_key, cls.returns_attention) for name, cls in MAPPERS.items()} == {
        name: (key, maps) for name, (key, maps, _) in EXPECTED.items()}
    assert all(cls.name == name for name, cls in MAPPERS.items())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_mapper_builds_from_the_dimensions_and_emits_its_prefix(name):
    torch.manual_seed(0)
    mapper = build_mapper(name, **DIMS)
    key, maps, length = EXPECTED[name]
    x = torch.randn(3, DIMS["feature_dim"]) if key == "clip_features" else torch.randn(3, DIMS["num_tokens"], DIMS["token_dim"])
    assert mapper.prefix_length == length and mapper(x).shape == (3, length, DIMS["embed_dim"])
    if maps:
        prefix, weights = mapper(x, return_attention=True)
        assert weights.shape == (3, length, DIMS["num_tokens"])


MAPPER_YAMLS = sorted(p.stem for p in (CONF / "model" / "mapper").glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_mapper_has_a_yaml_of_its_own_name(name):
    assert name in MAPPER_YAMLS  # its options and values: the test below, over every YAML
    assert yaml.safe_load((CONF / "model" / "mapper" / f"{name}.yaml").read_text())["name"] == name


@pytest.mark.parametrize("preset", MAPPER_YAMLS)
def test_every_mapper_yaml_is_a_registered_mapper_with_its_typed_options(preset, tmp_path):
    """Each mapper's own YAML, and a preset of a registered class (`pixel_shuffle_placed`, the embedded default):
    it names the class, composes through that class's typed schema with its own values, and builds."""
    spec = yaml.safe_load((CONF / "model" / "mapper" / f"{preset}.yaml").read_text())
    name = spec["name"]
    assert name in MAPPERS and f"/schema/mapper/{name}@_here_" in spec["defaults"]
    cfg = compose_train(tmp_path, tmp_path, [f"model/mapper={preset}"])  # the typed schema from the registry
    options = {k: v for k, v in cfg.model.mapper.items() if k != "name"}
    assert set(options) == set(MAPPERS[name].options())
    set_here = {k: v for k, v in spec.items() if k in options and not str(v).startswith("${")}  # interpolations aside
    assert {k: options[k] for k in set_here} == set_here  # the YAML's values, through the schema
    assert build_mapper(name, **DIMS, options=options).prefix_length == EXPECTED[name][2]


def test_the_embedded_default_codes_each_block_with_its_place(tmp_path):
    cfg = compose_train(tmp_path, tmp_path, [])
    assert dict(cfg.model.mapper) == {"name": "pixel_shuffle", "scale_factor": 2, "num_layers": 2, "positions": True}


def test_build_mapper_names_no_mapper():
    source = inspect.getsource(registry.build_mapper) + inspect.getsource(Mapper.build) + inspect.getsource(registry.Dimensions)
    assert not [name for name in MAPPERS if f'"{name}"' in source or f"'{name}'" in source]


def test_a_new_mapper_is_one_class():
    class Doubled(Mapper, name="doubled_for_test"):
        input_key = "clip_features"

        def __init__(self, in_dim: int, embed_dim: int, prefix_length: int, scale: float = 2.0):
            super().__init__()
            self.linear, self.scale = nn.Linear(in_dim, embed_dim * prefix_length), scale

        def forward(self, features):
            return self.scale * self.linear(features).view(features.shape[0], self.prefix_length, -1)

    try:
        mapper = build_mapper("doubled_for_test", **DIMS, options={"scale": 3.0})
        assert isinstance(mapper, Doubled) and mapper.scale == 3.0 and mapper.linear.in_features == DIMS["feature_dim"]
        assert mapper(torch.randn(2, DIMS["feature_dim"])).shape == (2, 5, DIMS["embed_dim"]) and Doubled.options() == ["scale"]
        with pytest.raises(TypeError, match="two mappers are named 'doubled_for_test'"):
            type("Again", (Mapper,), {"input_key": "clip_features"}, name="doubled_for_test")
    finally:
        MAPPERS.pop("doubled_for_test")
    with pytest.raises(TypeError, match="input_key"):
        type("Blind", (Mapper,), {}, name="blind_for_test")
    assert "blind_for_test" not in MAPPERS


def test_unknown_names_and_options_are_one_line_naming_the_key():
    with pytest.raises(ValueError, match=r"unknown mapper 'bogus': choose one of \['attention', 'mlp', 'mlp2x_gelu', "):
        build_mapper("bogus", **DIMS)
    with pytest.raises(ValueError, match="model.mapper.bogus is not an option of the pixel_shuffle mapper: use scale_factor, num_layers, positions"):
        build_mapper("pixel_shuffle", **DIMS, options={"bogus": 1})
    with pytest.raises(ValueError, match="model.mapper.num_tokens is not an option of the mlp2x_gelu mapper: it is read from the encoder"):
        build_mapper("mlp2x_gelu", **DIMS, options={"num_tokens": 4})


def test_mlp2x_gelu_is_llavas_projector_on_every_token():
    torch.manual_seed(0)
    mapper = TokenMLPMapper(in_dim=24, embed_dim=40, num_tokens=16)
    first, act, second = mapper.projector
    assert (first.in_features, first.out_features, second.in_features, second.out_features) == (24, 40, 40, 40)
    assert isinstance(act, nn.GELU) and act.approximate == "none" and len(mapper.projector) == 3
    tokens = torch.randn(2, 16, 24)
    expected = torch.stack([torch.stack([second(torch.nn.functional.gelu(first(t))) for t in image]) for image in tokens])
    torch.testing.assert_close(mapper(tokens), expected)
    assert len(TokenMLPMapper(24, 40, 16, num_layers=1).projector) == 1  # LLaVA's `linear`


def reference_shuffle(tokens: torch.Tensor, s: int) -> torch.Tensor:
    """Space-to-depth by hand: output token (i, j) concatenates the s x s block's tokens row by row."""
    b, n, w = tokens.shape
    g = int(n**0.5)
    out = torch.empty(b, (g // s) ** 2, w * s * s)
    for i in range(g // s):
        for j in range(g // s):
            block = [tokens[:, (i * s + r) * g + (j * s + c)] for r in range(s) for c in range(s)]
            out[:, i * (g // s) + j] = torch.cat(block, dim=-1)
    return out


@pytest.mark.parametrize(("g", "s"), [(4, 2), (6, 3), (6, 2), (4, 1)])
def test_pixel_shuffle_groups_each_block_into_one_token(g, s):
    tokens = torch.randn(2, g * g, 3)
    torch.testing.assert_close(pixel_shuffle(tokens, s), reference_shuffle(tokens, s))


def test_the_four_patches_of_a_2x2_block_land_in_one_token():
    g = 4
    ids = torch.arange(g * g, dtype=torch.float).view(1, g * g, 1)  # token n carries its own index
    shuffled = pixel_shuffle(ids, 2)  # (1, 4, 4)
    assert shuffled[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_pixel_shuffle_mapper_is_nanovlms_projector():
    torch.manual_seed(0)
    mapper = PixelShuffleMapper(in_dim=24, embed_dim=40, num_tokens=16, scale_factor=2)
    (proj,) = mapper.projector
    assert proj.bias is None and proj.weight.shape == (40, 24 * 4) and abs(proj.weight.std().item() - 0.02) < 0.003
    tokens = torch.randn(2, 16, 24)
    torch.testing.assert_close(mapper(tokens), reference_shuffle(tokens, 2) @ proj.weight.T)


def test_pixel_shuffle_positions_tell_one_block_at_two_places_apart():
    torch.manual_seed(0)
    mapper = PixelShuffleMapper(in_dim=24, embed_dim=40, num_tokens=16, scale_factor=2, num_layers=2, positions=True)
    assert mapper.position.shape == (4, 40)
    block = torch.randn(4, 24)
    tokens = torch.zeros(1, 16, 24)
    tokens[0, [0, 1, 4, 5]] = block  # the same content in the top-left block ...
    tokens[0, [10, 11, 14, 15]] = block  # ... and in the bottom-right one
    out = mapper(tokens)[0]
    first, gelu, last = mapper.projector
    expected = last(gelu(first(reference_shuffle(tokens, 2)) + mapper.position))[0]
    torch.testing.assert_close(out, expected)  # the place is added before the GELU, not after the MLP
    assert not torch.allclose(out[0], out[3], atol=1e-4)
    plain = PixelShuffleMapper(in_dim=24, embed_dim=40, num_tokens=16, scale_factor=2, num_layers=2)
    torch.testing.assert_close(plain(tokens)[0, 0], plain(tokens)[0, 3])  # without them the two are one


@pytest.mark.parametrize(("num_tokens", "scale", "message"), [
    (16, 3, "model.mapper.scale_factor=3 does not divide the encoder's 4x4 patch grid: use one of 1, 2, 4"),
    (36, 4, "model.mapper.scale_factor=4 does not divide the encoder's 6x6 patch grid: use one of 1, 2, 3, 6"),
    (16, 0, "model.mapper.scale_factor=0 does not divide"),
    (12, 2, "needs a square patch grid; the encoder gives 12 tokens"),
])
def test_a_bad_scale_factor_is_one_line(num_tokens, scale, message):
    with pytest.raises(ValueError, match=message) as raised:
        build_mapper("pixel_shuffle", **{**DIMS, "num_tokens": num_tokens}, options={"scale_factor": scale})
    assert "\n" not in str(raised.value)


def test_an_attention_checkpoints_mapper_builds_with_the_same_keys():
    """What checkpoints written before the registry hold: {name: attention, ...its options}."""
    old = {"name": "attention", "num_layers": 1, "num_heads": 2, "mlp_ratio": 4.0, "dropout": 0.0}
    options = dict(old)
    mapper = build_mapper(options.pop("name"), **DIMS, options=options)
    assert type(mapper).__name__ == "AttentionMapper" and mapper.prefix_length == 5
    assert {k for k in mapper.state_dict() if not k.startswith("layers.")} == {
        "proj.weight", "proj.bias", "token_position", "queries", "norm.weight", "norm.bias"}
