"""A picture of captioned images: the first thing to look at after a run."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from captioner.data.images import load_image


def caption_grid(
    images: Sequence[str | Path],
    captions: Sequence[str],
    path: str | Path,
    references: Sequence[str] | None = None,
    columns: int = 4,
) -> Path:
    """Save images in a grid, each titled with its caption (and one human reference in grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, image, caption) in enumerate(zip(axes.flat, images, captions)):
        ax.imshow(load_image(image))
        ax.set_title("\n".join(textwrap.wrap(caption, 34)), fontsize=9)
        if references is not None:
            ax.text(0.5, -0.04, "\n".join(textwrap.wrap(f"human: {references[i]}", 40)), fontsize=7,
                    color="0.4", ha="center", va="top", transform=ax.transAxes)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
