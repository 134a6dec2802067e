"""The mapper registry: each mapper class registers itself under the name its YAML uses.

A mapper (a "bridge": image features in, a prefix of decoder input embeddings out) subclasses
`Mapper` and names itself in its class statement:

    class PixelShuffleMapper(Mapper, name="pixel_shuffle"):
        input_key = "patch_tokens"     # what it reads: "clip_features" (B, E) or "patch_tokens" (B, N, W)
        returns_attention = False      # True: forward(x, return_attention=True) -> (prefix, (B, P, N) maps)

Its constructor asks for the dimensions it needs by naming them (`DIMENSIONS`: `in_dim` is the width
of what it reads, the others are `Dimensions`' fields); every other parameter is an option, a key of
`conf/model/mapper/<name>.yaml` whose typed schema config.py reads from the signature. A built mapper's
`prefix_length` is the number of embeddings it emits: `model.prefix_length` for a mapper that takes
it, its own count (one per patch token, or per block of them) for one that does not.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

INPUT_KEYS = ("clip_features", "patch_tokens")  # the encoder's pooled vector (B, E), its patch tokens (B, N, W)


@dataclass(frozen=True)
class Dimensions:
    """What a mapper may ask of the encoder and decoder it sits between."""

    feature_dim: int  # the pooled vector's width, E
    token_dim: int  # a patch token's width, W
    num_tokens: int  # patch tokens per image, N (a g x g grid)
    embed_dim: int  # the decoder's input embedding width, D
    prefix_length: int  # model.prefix_length: the slots a mapper with learned slots fills

    def given(self, input_key: str) -> dict[str, int]:
        """Every dimension by its constructor name; `in_dim` is the width of what `input_key` reads."""
        return {"in_dim": self.feature_dim if input_key == "clip_features" else self.token_dim, **dataclasses.asdict(self)}


DIMENSIONS = ("in_dim", *(f.name for f in dataclasses.fields(Dimensions)))
MAPPERS: dict[str, type[Mapper]] = {}  # name -> class, filled as the classes are defined


class Mapper(nn.Module):
    """A mapper's declared capabilities and its one constructor contract (`build`)."""

    name: ClassVar[str]
    input_key: ClassVar[str]
    returns_attention: ClassVar[bool] = False
    prefix_length: int

    def __init_subclass__(cls, name: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if name is None:  # a shared base of several mappers, never built itself
            return
        if name in MAPPERS:
            raise TypeError(f"two mappers are named {name!r}: {MAPPERS[name].__qualname__} and {cls.__qualname__}")
        if getattr(cls, "input_key", None) not in INPUT_KEYS:
            raise TypeError(f"mapper {name!r} must declare input_key as one of {INPUT_KEYS}")
        cls.name = name
        MAPPERS[name] = cls

    @classmethod
    def options(cls) -> list[str]:
        """The constructor parameters that are config keys (everything but the dimensions)."""
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", *DIMENSIONS)]

    @classmethod
    def build(cls, dims: Dimensions, **options) -> Mapper:
        """The mapper for these dimensions: each constructor parameter named in `DIMENSIONS` gets its
        value from `dims`, the rest from `options` (the YAML's keys)."""
        params = inspect.signature(cls.__init__).parameters
        for key in options:
            if key in DIMENSIONS:
                raise ValueError(f"model.mapper.{key} is not an option of the {cls.name} mapper: it is read from the "
                                 f"encoder and decoder (the prefix from model.prefix_length)")
            if key not in params:
                raise ValueError(f"model.mapper.{key} is not an option of the {cls.name} mapper: use "
                                 f"{', '.join(cls.options()) or 'none'}")
        mapper = cls(**{k: v for k, v in dims.given(cls.input_key).items() if k in params}, **options)
        if "prefix_length" in params:
            mapper.prefix_length = dims.prefix_length
        return mapper


def build_mapper(name: str, *, feature_dim: int, token_dim: int, num_tokens: int, embed_dim: int, prefix_length: int,
                 options: Mapping | None = None) -> Mapper:
    """Build the registered mapper `name` with its `options` (the YAML's keys but `name`); dimensions come
    from the loaded encoder and decoder."""
    if name not in MAPPERS:
        raise ValueError(f"unknown mapper {name!r}: choose one of {sorted(MAPPERS)} (model.mapper.name)")
    dims = Dimensions(feature_dim=feature_dim, token_dim=token_dim, num_tokens=num_tokens, embed_dim=embed_dim,
                      prefix_length=prefix_length)
    return MAPPERS[name].build(dims, **(options or {}))
