"""W&B offline by default: the run directory holds the loss, metric and sample-table history."""

from __future__ import annotations

import json
import os
import struct
import time

import pytest
from wandb.proto import wandb_internal_pb2

from captioner.loggers import configure_wandb
from captioner.train import run
from conftest import compose_train

BLOCK, HEADER = 32768, 7  # the .wandb transaction log: LevelDB-style 32 KiB blocks of framed records


def history(path, timeout: float = 60.0) -> tuple[dict[str, list], list[str]]:
    """Every history value in a `.wandb` file, decoded with W&B's own protobuf `Record`, and the files of
    its logged artifacts. W&B's service process writes the file behind the run: wait for its `exit` record."""
    start = time.monotonic()
    while True:
        values, files, finished = _read(path.read_bytes())
        if finished or time.monotonic() - start > timeout:
            return values, files
        time.sleep(0.2)


def _read(data: bytes) -> tuple[dict[str, list], list[str], bool]:
    assert data[:4] == b":W&B", "not a W&B transaction log"
    values: dict[str, list] = {}
    files: list[str] = []
    finished = False
    pos, chunks = 7, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # block tail too short for a header: zero padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK
            continue
        chunks += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # FULL, or LAST of a FIRST/MIDDLE/LAST chain
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            finished |= record.WhichOneof("record_type") == "exit"
            if record.WhichOneof("record_type") == "artifact":
                files += [entry.path for entry in record.artifact.manifest.contents]
            if record.WhichOneof("record_type") == "history":
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    values.setdefault(key, []).append(json.loads(item.value_json))
    return values, files, finished


def test_offline_run_directory_holds_loss_metric_and_sample_history(tmp_path, data_dir, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_train(tmp_path / "run", data_dir,
                        ["experiment=smoke", "debug=limit", "logger=default", "trainer.max_epochs=2", "score=false"])
    run(cfg)
    assert "anonymous setting" not in capfd.readouterr().err  # wandb's warning about Lightning's retired argument
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    logged, artifact_files = history(run_file)
    assert len(logged["train/loss"]) == 4 and all(v > 0 for v in logged["train/loss"])  # 2 steps x 2 epochs
    assert len(logged["val/cider"]) == 2 and len(logged["val/loss"]) == 2  # one per validation
    assert "lr-AdamW" in logged
    assert logged["val/samples/_type"] == ["table-file"] * 2 and logged["val/samples/nrows"][0] > 0

    table = json.loads((run_file.parent / "files" / logged["val/samples/path"][-1]).read_text())
    assert table["columns"] == ["step", "image_id", "image", "prediction", "references"]
    step, image_id, image, prediction, references = table["data"][0]
    assert step == 4 and image == "Image" and isinstance(prediction, str)
    assert len(references.split(" | ")) == 5  # the embedded data has 5 captions per image
    # the images themselves travel in the table's artifact, named after the validation image files
    assert any(f.startswith("media/images/") and f.endswith(f"{image_id:08d}.png") for f in artifact_files)


@pytest.mark.parametrize(("env", "mode"), [({}, "offline"), ({"WANDB_API_KEY": "x" * 40}, None), ({"WANDB_MODE": "online"}, "online")])
def test_wandb_is_offline_unless_logged_in_or_chosen(env, mode, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    configure_wandb()
    assert os.environ.get("WANDB_MODE") == mode
