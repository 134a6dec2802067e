"""`export` and `caption -o` write whole files or nothing: a failure mid-way leaves the previous output as it was."""

from __future__ import annotations

import pytest

from captioner import caption, export
from test_export import trained  # noqa: F401 - a module-scoped fixture: a smoke run's last.ckpt


def _snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_an_export_that_fails_midway_leaves_the_previous_export_whole(trained, tmp_path, monkeypatch):  # noqa: F811
    out = export.export(trained[0], tmp_path / "export")
    before = _snapshot(out)

    def full_disk(spec, dest):
        raise OSError(28, "No space left on device")

    real = export._exported_weights

    def other_weights(module):  # this export's weights differ from the previous one's
        tensors, rebuilt = real(module)
        return {k: v * 2 for k, v in tensors.items()}, rebuilt

    monkeypatch.setattr(export, "_exported_weights", other_weights)
    monkeypatch.setattr(export, "_copy_tokenizer", full_disk)  # after the new weights, before the config
    with pytest.raises(OSError, match="No space left"):
        export.export(trained[0], out)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary directory left


def test_caption_o_that_fails_midway_leaves_the_previous_output_whole(trained, tmp_path, monkeypatch):  # noqa: F811
    from PIL import Image

    from captioner.api import Captioner

    images = tmp_path / "images"
    images.mkdir()
    for k in range(4):
        Image.new("RGB", (32, 32), (60 * k, 0, 0)).save(images / f"{k}.png")
    out = tmp_path / "captions.jsonl"
    assert caption.main(["--ckpt", str(trained[0]), str(images), "-o", str(out), "--batch-size", "2"]) == 0
    before = out.read_bytes()
    assert before.count(b"\n") == 4

    real, calls = Captioner.caption_pixels, []

    def dies_on_the_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Captioner, "caption_pixels", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        caption.main(["--ckpt", str(trained[0]), str(images), "-o", str(out), "--batch-size", "2"])
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["captions.jsonl", "images"]
