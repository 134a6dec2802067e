"""The real path at full size, as a user with the published weights runs it (slow: `make test-slow`).

ViT-B/32 and GPT-2 124M with random weights are saved the way a user has them — an OpenAI CLIP `.pt`
state dict (fp16, as OpenAI ships it; `clip.model.build_model` reads every size from it) and a GPT-2
`save_pretrained` directory with GPT-2's real tokenizer — and every COCO experiment runs on coco_mini
through the entry points, in subprocesses: extract -> train (a step limit) -> evaluate -> export ->
`captioner.caption` -> one request to `captioner.serve`. Each stage's wall time and the peak RSS of
its process are printed as a table (the README quotes them).

    HF_HUB_OFFLINE=1 python -m pytest -m slow tests/test_real_path.py -s
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from rich.console import Console
from rich.table import Table

from conftest import ROOT, SHARED_DATA
from test_experiments import COCO_EXPERIMENTS, coco_mini_overrides
from test_serve import free_port

pytestmark = pytest.mark.slow
STAGE_TIMEOUT = 3600


@pytest.fixture(scope="module")
def user_weights(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(ViT-B-32.pt, gpt2/ directory, tokenizer directory) with random weights at the published sizes."""
    from clip.model import CLIP
    from transformers import GPT2Config, GPT2LMHeadModel

    from captioner.models.zoo import CLIP_ARCHS, resolve

    tokenizer = SHARED_DATA / "gpt2_tokenizer"
    if not (tokenizer / "vocab.json").is_file():
        pytest.skip("../shared/data/gpt2_tokenizer is not present")
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    clip_model = CLIP(**resolve({"arch": "ViT-B/32"}, CLIP_ARCHS, "model.encoder"))
    state = {k: v.half() if v.is_floating_point() else v for k, v in clip_model.state_dict().items()}
    torch.save(state, folder / "ViT-B-32.pt")
    gpt2 = GPT2LMHeadModel(GPT2Config())  # GPT-2 small: 124,439,808 parameters, 50,257 tokens
    assert sum(p.numel() for p in gpt2.parameters()) == 124_439_808
    gpt2.save_pretrained(folder / "gpt2")
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tokenizer / name, folder / "gpt2" / name)
    return folder / "ViT-B-32.pt", folder / "gpt2", folder / "gpt2"


class Stages:
    """The stages of one experiment: (name, wall seconds, peak RSS MiB) rows, and the environment they run in."""

    def __init__(self, experiment: str):
        self.experiment, self.rows = experiment, []
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def run_stage(stages: Stages, name: str, module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m module args` through a shim that prints the stage's own peak RSS."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so it would report this pytest process's peak
    shim = ("import atexit, re, runpy, sys; sys.argv = sys.argv[1:]; "
            "atexit.register(lambda: print('PEAK_RSS_KIB', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1], file=sys.stderr)); "
            f"runpy.run_module({module!r}, run_name='__main__')")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", shim, module, *args], cwd=ROOT, env=stages.env, capture_output=True,
                          text=True, timeout=STAGE_TIMEOUT)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    peak = [int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KIB")]
    stages.rows.append((name, time.monotonic() - start, peak[-1] / 1024 if peak else float("nan")))
    return done


@pytest.mark.parametrize("experiment", COCO_EXPERIMENTS)
def test_every_coco_experiment_runs_end_to_end_at_full_size(experiment, user_weights, tmp_path):
    coco_mini = SHARED_DATA / "coco_mini"
    if not coco_mini.is_dir():
        pytest.skip("../shared/data/coco_mini is not present")
    clip_pt, gpt2_dir, tokenizer = user_weights
    stages = Stages(experiment)
    setup = [*coco_mini_overrides(coco_mini, tmp_path / "features", clip_pt, gpt2_dir, tokenizer), "trainer=cpu", "data.eval_batch_size=16"]
    common = [f"experiment={experiment}", *setup]
    train = ["score=false", "score_meteor=false"]
    run_stage(stages, "extract", "captioner.extract", *common, f"hydra.run.dir={tmp_path / 'extract'}")
    steps = ["trainer.max_steps=3", "trainer.limit_val_batches=1", "model.val_cider_images=4", "model.val_decoding.max_new_tokens=5"]
    if "scst" in experiment:  # a second stage: it starts from a cross-entropy checkpoint of the same model and data
        first = tmp_path / "cross_entropy"
        run_stage(stages, "train cross-entropy first (3 steps)", "captioner.train", "experiment=coco_attn", *setup, *steps, *train,
                  f"hydra.run.dir={first}")
        # 40 images x 5 samples of GPT-2 124M with gradients is past 24 GB on the CPU (the OOM killer ended it): 8 x 5
        train = [*train, f"init_from={first / 'checkpoints' / 'last.ckpt'}", "data.batch_size=8"]
    train_dir = tmp_path / "train"
    run_stage(stages, "train (3 steps)", "captioner.train", *common, *steps, *train, f"hydra.run.dir={train_dir}")
    ckpt = train_dir / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 3

    eval_dir = tmp_path / "eval"
    run_stage(stages, "evaluate (test, 80 images)", "captioner.evaluate", f"ckpt_path={ckpt}", "split=test",
              "decoding.strategy=greedy", "decoding.max_new_tokens=8", "meteor=false", "+data.eval_batch_size=16",
              f"hydra.run.dir={eval_dir}")
    scores = json.loads((eval_dir / "scores.json").read_text())
    assert set(scores["model"]) >= {"Bleu_4", "CIDEr", "ROUGE_L"}
    assert len(json.loads((eval_dir / "captions_test.json").read_text())) == 80

    export_dir = tmp_path / "export"
    run_stage(stages, "export", "captioner.export", f"ckpt={ckpt}", f"out={export_dir}")
    config = json.loads((export_dir / "config.json").read_text())
    assert config["hyper_parameters"]["encoder"] == str(clip_pt) and "encoder." in " ".join(config["rebuilt_from_config"])

    photos = sorted((coco_mini / "images" / "val2017").glob("*.jpg"))[:4]
    run_stage(stages, "caption (4 photos)", "captioner.caption", "--ckpt", str(export_dir), *map(str, photos),
              "-o", str(tmp_path / "captions.jsonl"), "--max-new-tokens", "8")
    rows = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert [Path(r["file"]).name for r in rows] == [p.name for p in photos] and all(isinstance(r["caption"], str) for r in rows)

    port = free_port()
    start = time.monotonic()
    server = subprocess.Popen([sys.executable, "-m", "captioner.serve", f"ckpt={export_dir}", f"port={port}", "log_level=warning"],
                              cwd=ROOT, env=stages.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            assert time.monotonic() - start < 600, "the server did not come up within 10 minutes"
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
        answer = httpx.post(f"{url}/v1/captions?max_new_tokens=8", files={"images": (photos[0].name, photos[0].read_bytes(), "image/jpeg")},
                            timeout=600)
        assert answer.status_code == 200, answer.text
        result = answer.json()["results"][0]
        assert isinstance(result["caption"], str) and (result["width"], result["height"]) > (0, 0)
    finally:
        server.terminate()
        server.wait(timeout=60)
    stages.rows.append(("serve (start + 1 request)", time.monotonic() - start, float("nan")))

    table = Table("stage", "wall s", "peak RSS MiB", title=f"{experiment}: ViT-B/32 + GPT-2 124M on coco_mini (CPU)")
    for name, seconds, rss in stages.rows:
        table.add_row(name, f"{seconds:.0f}", "-" if rss != rss else f"{rss:.0f}")
    table.add_row("total", f"{sum(s for _, s, _ in stages.rows):.0f}", f"{max(r for _, _, r in stages.rows if r == r):.0f}")
    Console(width=120).print(table)
