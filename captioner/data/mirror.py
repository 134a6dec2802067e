"""Mirrored training images: each training caption that names a side ("on the left", "top right") gets a
twin, the image flipped left to right with the side words swapped, and each epoch reads one of the two
at random.

Only captions that name a side are mirrored. A caption that names none may still imply one (three
shapes "in a row" are listed left to right), and its mirror image would then be described wrongly. A
scene whose captions name no side gains nothing from a twin anyway: it reads the same either way round.

A mirrored image's record has its own id, `-(image_id + 1)`: image ids are non-negative, so the twin
never meets a real image in a feature store.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace

from captioner.data.coco import ImageRecord

SIDES = {"left": "right", "right": "left"}  # the default swap; data.mirror_swap sets others


def mirrored_id(image_id: int) -> int:
    return -(image_id + 1)


class SideWords:
    """The words a left-to-right flip swaps, matched as whole words in any case, the case kept."""

    def __init__(self, swap: Mapping[str, str]):
        self.swap = {k.lower(): v.lower() for k, v in swap.items()}
        bad = [k for k, v in self.swap.items() if self.swap.get(v) != k]
        if not self.swap or bad:
            raise ValueError(f"data.mirror_swap={dict(swap)} must pair each word with one that maps back "
                             f"(e.g. {{left: right, right: left}}); {bad or 'it is empty'}")
        self.pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(self.swap, key=len, reverse=True))) + r")\b",
                                  re.IGNORECASE)

    def names_a_side(self, caption: str) -> bool:
        return self.pattern.search(caption) is not None

    def mirrored(self, caption: str) -> str:
        def swapped(match: re.Match) -> str:
            word = match.group(0)
            other = self.swap[word.lower()]
            return other.upper() if word.isupper() and len(word) > 1 else other.capitalize() if word[0].isupper() else other

        return self.pattern.sub(swapped, caption)


def mirror_records(records: Sequence[ImageRecord], words: SideWords) -> list[ImageRecord]:
    """The mirrored twin of each record with a caption that names a side, holding those captions only,
    their side words swapped, in the records' order."""
    twins = []
    for r in records:
        captions = tuple(words.mirrored(c) for c in r.captions if words.names_a_side(c))
        if captions:
            twins.append(replace(r, image_id=mirrored_id(r.image_id), captions=captions, mirrored=True))
    return twins


def twin_pairs(records: Sequence[ImageRecord], pairs: Sequence[tuple[int, int]], words: SideWords) -> list[int]:
    """For each (record, caption) pair of an unmirrored image, the index in `pairs` of its mirrored twin,
    or -1 where the caption names no side. `records` ends with the twins `mirror_records` made; so do
    `pairs`, whose unmirrored pairs are the ones listed."""
    index = {pair: i for i, pair in enumerate(pairs)}
    row = {r.image_id: i for i, r in enumerate(records)}
    out = []
    for r, k in pairs:
        record = records[r]
        if record.mirrored:
            break
        if not words.names_a_side(record.captions[k]):
            out.append(-1)
            continue
        # the twin holds the side-naming captions only, in order: caption k is the j-th of them
        j = sum(words.names_a_side(c) for c in record.captions[:k])
        out.append(index[(row[mirrored_id(record.image_id)], j)])
    return out
