"""Training callbacks: pictures of the run."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class LossCurve(L.Callback):
    """Writes a PNG of train/loss per step and val/loss, val/cider per epoch after every validation."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.train: list[tuple[int, float]] = []
        self.val: dict[str, list[tuple[int, float]]] = {"val/loss": [], "val/cider": []}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.train.append((trainer.global_step, float(loss)))

    def on_validation_epoch_end(self, trainer, module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        for key, points in self.val.items():
            if key in trainer.callback_metrics:
                points.append((trainer.global_step, float(trainer.callback_metrics[key])))
        self.draw()

    def draw(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
        if self.train:
            steps, losses = zip(*self.train)
            left.plot(steps, losses, lw=0.6, alpha=0.5, label="train/loss")
        if self.val["val/loss"]:
            left.plot(*zip(*self.val["val/loss"]), "o-", label="val/loss")
        left.set(xlabel="step", ylabel="loss", yscale="log")
        left.legend()
        if self.val["val/cider"]:
            right.plot(*zip(*self.val["val/cider"]), "o-", color="C2")
        right.set(xlabel="step", ylabel="val/cider")
        fig.tight_layout()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.path, dpi=100)
        plt.close(fig)
