"""The commands as a user runs them: bad config values are one line naming the key and what is allowed,
every `--help` answers, and a smoke run prints none of the warnings a user could not act on."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

ENTRY_POINTS = ["train", "evaluate", "extract", "caption", "serve", "export", "sweep_summary", "import_clipcap", "pretrain_clip",
                "pretrain_lm"]


def command(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HYDRA_FULL_ERROR": "", **(env or {})})


@pytest.mark.parametrize(("override", "named"), [
    ("data.batch_size=-3", ["data.batch_size", "positive integer"]),
    ("model/mapper=bogus", ["model/mapper=bogus", "attention", "mlp", "transformer"]),
    ("trainer.max_epochs=abc", ["trainer.max_epochs", "Integer"]),
    ("test_decoding.strategy=x", ["test_decoding.strategy", "greedy", "beam", "sample"]),
    ("data.bogus=1", ["data.bogus", "batch_size"]),
])
def test_a_bad_config_value_is_one_line_naming_the_key_and_what_is_allowed(override, named, tmp_path):
    done = command("-m", "captioner.train", "experiment=smoke", override, f"hydra.run.dir={tmp_path}", timeout=120)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert all(word in lines[0] for word in named), lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "config.yaml").exists()  # refused before the run started


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_answers_help(entry):
    done = command("-m", f"captioner.{entry}", "--help", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower() or "== Config ==" in done.stdout or "Powered by Hydra" in done.stdout, done.stdout[:500]


# the messages that used to open every run, none of which the user can do anything about
UNACTIONABLE = ["pkg_resources is deprecated", "anonymous setting", "LeafSpec", "loss_type=None", "module(s) in eval mode", "Tip: For seamless cloud logging"]


def test_a_smoke_run_prints_no_warning(tmp_path, data_dir):
    done = command("-m", "captioner.train", "experiment=smoke", f"hydra.run.dir={tmp_path}",
                   env={"CAPTIONER_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "captions_test.json").is_file()
    for message in UNACTIONABLE:
        assert message not in done.stderr + done.stdout, message
    assert not re.search(r"\w+Warning: |WARNING", done.stderr), done.stderr[-3000:]


def test_pretraining_runs_without_a_wandb_login(tmp_path):
    """No WANDB_MODE, no key, no ~/.netrc: W&B goes offline, as in training, instead of refusing to start."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    done = subprocess.run(
        [sys.executable, "-m", "captioner.pretrain_lm", f"hydra.run.dir={tmp_path / 'run'}", "data.synthetic.sizes.train=60",
         "data.synthetic.sizes.val=20", "data.synthetic.sizes.test=20", "pretrain.lm.steps=2", "pretrain.lm.batch_size=8",
         "pretrain.tokenizer.vocab_size=300"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**env, "HOME": str(tmp_path), "CAPTIONER_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "data" / "synthetic" / "features" / "pretrained" / "gpt2" / "model.safetensors").is_file()
    assert list((tmp_path / "run").rglob("offline-run-*")), "W&B did not log offline"
