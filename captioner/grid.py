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
    height = 4.0 if references is not None else 3.6  # room for the grey reference under each image
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, height * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, image, caption) in enumerate(zip(axes.flat, images, captions)):
        ax.imshow(load_image(image))
        ax.set_title("\n".join(textwrap.wrap(caption, 34)), fontsize=9)
        if references is not None:
            ax.text(0.5, -0.04, "\n".join(textwrap.wrap(f"human: {references[i]}", 40)), fontsize=7,
                    color="0.4", ha="center", va="top", transform=ax.transAxes)
    # margins in inches: two title lines above each image, two reference lines below it
    top, bottom = 0.45 / fig.get_figheight(), (0.45 if references is not None else 0.1) / fig.get_figheight()
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - top, bottom=bottom, wspace=0.05,
                        hspace=0.35 if references is not None else 0.15)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
