"""bench/gpu_check.sh --device cpu: the GPU check's stages, at tiny sizes, write their report (slow: minutes of CPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED_DATA

STAGES = ["user weights", "extract", "train (bf16-mixed, fused AdamW, pinned memory)", "evaluate (test split)",
          "caption (4 photos)", "bench/train.py", "bench/decode.py"]


@pytest.mark.slow
def test_the_gpu_check_runs_on_the_cpu_and_writes_its_report(tmp_path):
    if not (SHARED_DATA / "coco_mini").is_dir() or not (SHARED_DATA / "gpt2_tokenizer" / "vocab.json").is_file():
        pytest.skip("../shared/data (coco_mini, gpt2_tokenizer) is not present")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    report = (tmp_path / "report.md").read_text()
    assert done.returncode == 0, report[-4000:] + done.stderr[-2000:]
    for stage in STAGES:
        assert f"## {stage}: ok in " in report, stage
    assert report.rstrip().splitlines()[-1].startswith("all stages passed in ")
    assert "## train (model.compile=true)" not in report  # CUDA only
    captions = (tmp_path / "captions.jsonl").read_text().splitlines()
    assert len(captions) == 4


def test_the_gpu_check_refuses_a_wrong_device_or_missing_data_in_one_line(tmp_path):
    for args, message in ((["--device", "tpu"], "--device tpu: choose cuda or cpu"),
                          (["--device", "cpu", "--data", str(tmp_path / "absent")], "coco_mini is not at")):
        done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args, "--out", str(tmp_path / "out")],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out" / "report.md").exists()


def test_bf16_mixed_training_with_fused_adamw_clips_gradients(tmp_path, data_dir, monkeypatch):
    """trainer=gpu's combination (bf16-mixed, fused AdamW, conf/trainer's gradient clipping), on the CPU."""
    import torch

    from captioner.train import run
    from conftest import compose_train

    clipped = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm, *a, **kw: clipped.append(max_norm) or real(params, max_norm, *a, **kw))
    cfg = compose_train(tmp_path / "run", data_dir, ["experiment=smoke", "debug=limit", "score=false", "trainer.precision=bf16-mixed",
                                                     "+model.adamw=fused"])
    run(cfg)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert clipped and set(clipped) == {cfg.trainer.gradient_clip_val}  # every step clipped at the configured norm
