"""The commands as a user runs them: bad config values are one line naming the key and what is allowed
while a bug keeps its traceback, every entry point follows one convention and lists its options with
`--help`, none sets HF_HUB_OFFLINE, budgets stay with the config they belong to, and a smoke run prints
none of the warnings a user could not act on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

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
    ("score_weights=final", ["score_weights", "best", "last"]),
    ("model.decoder_lr=0", ["model.decoder_lr", "a learning rate > 0, or null"]),
    ("data.mirror_swap.left=up", ["data.mirror_swap", "map back"]),
    ("pretrain=null", ["pretrain=null", "model.encoder.name, model.decoder, model.tokenizer", "keep pretrain"]),
])
def test_a_bad_config_value_is_one_line_naming_the_key_and_what_is_allowed(override, named, tmp_path):
    done = command("-m", "captioner.train", "experiment=smoke", override, f"hydra.run.dir={tmp_path}", timeout=120)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert all(word in lines[0] for word in named), lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "config.yaml").exists()  # refused before the run started


def test_without_pretrain_an_experiments_tweaks_to_it_build_nothing(tmp_path):
    # experiment=smoke shortens the pretraining steps; with pretrain=null those keys remain and must not run
    # a pretraining step, so the first thing missing is the encoder the user named
    done = command("-m", "captioner.train", "experiment=smoke", "pretrain=null", f"model.encoder.name={tmp_path}/clip.pt",
                   f"model.decoder={tmp_path}/gpt2", f"model.tokenizer={tmp_path}/tokenizer", f"hydra.run.dir={tmp_path}/run",
                   timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-3000:]
    assert f"{tmp_path}/clip.pt" in errors[0] and "Traceback" not in done.stderr


def entry_source(entry: str) -> str:
    return (ROOT / "captioner" / f"{entry}.py").read_text()


def test_the_entry_point_list_is_every_runnable_module():
    runnable = {p.stem for p in (ROOT / "captioner").glob("*.py") if 'if __name__ == "__main__"' in p.read_text()}
    assert runnable == set(ENTRY_POINTS)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_follows_one_convention(entry):
    """Hydra for commands of settings, argparse for commands of files; nobody parses key=value by hand."""
    source = entry_source(entry)
    assert ("@hydra_main(" in source) != ("argparse.ArgumentParser(" in source), entry
    assert "sys.argv" not in source, entry  # arguments come from Hydra or argparse, never read by hand


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_answers_help_with_its_options(entry):
    done = command("-m", f"captioner.{entry}", "--help", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    source = entry_source(entry)
    if "@hydra_main(" in source:
        config = source.split('@hydra_main("', 1)[1].split('"', 1)[0]
        text = (ROOT / "conf" / f"{config}.yaml").read_text()
        commands = [line for line in text.splitlines() if line.startswith(f"# python -m captioner.{entry}")]
        assert commands and all(c[2:] in done.stdout for c in commands), done.stdout[:800]  # what it is for
        own = [k for k in yaml.safe_load(text) if k not in ("defaults", "hydra")]
        assert "== Config ==" in done.stdout and all(f"\n{k}:" in done.stdout for k in own), done.stdout[-1500:]
    else:
        options = re.findall(r'add_argument\("((?:--)?[a-z][\w-]*)"', source)
        hidden = re.findall(r'add_argument\("(--[\w-]+)"[^\n]*SUPPRESS', source)
        assert options and done.stdout.startswith("usage:"), done.stdout[:500]
        assert all(o in done.stdout for o in options if o not in hidden), done.stdout


def test_no_entry_point_sets_hf_hub_offline():
    """Names download where the hub is reachable: only the tests and CI set HF_HUB_OFFLINE."""
    sources = [*(ROOT / "captioner").rglob("*.py"), *(ROOT / "bench").glob("*.py"), ROOT / "Makefile"]
    setting = re.compile(r"""environ\[\s*["']HF_HUB_OFFLINE["']\s*\]\s*=(?!=)|(setdefault|putenv)\(\s*["']HF_HUB_OFFLINE"""
                         r"""|["']HF_HUB_OFFLINE["']\s*:|\bHF_HUB_OFFLINE\s*=\s*["']|^\s*export\s+HF_HUB_OFFLINE""", re.M)
    assert [str(p) for p in sources if setting.search(p.read_text())] == []
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    modules = ", ".join(repr(f"captioner.{e}") for e in ENTRY_POINTS)
    done = subprocess.run([sys.executable, "-c", f"import importlib, os\nfor m in [{modules}]: importlib.import_module(m)\n"
                           "print(os.environ.get('HF_HUB_OFFLINE'))"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "None"


def test_a_gpu_coco_config_carries_none_of_the_embedded_defaults_budget():
    done = command("-m", "captioner.train", "data=coco", "model=clipcap", "trainer=gpu", "--cfg", "job", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    coco = yaml.safe_load(done.stdout)
    assert coco["trainer"]["max_time"] is None and coco["trainer"]["max_epochs"] is None, coco["trainer"]
    assert coco["data"]["batch_size"] == 40, coco["data"]  # ClipCap's, from conf/data/coco.yaml
    embedded = yaml.safe_load(command("-m", "captioner.train", "--cfg", "job", timeout=300).stdout)
    # the embedded default keeps its own: steps of 32 captions up to 20 epochs (a data.splits world trains as long) and a time cap
    trainer = embedded["trainer"]
    assert (trainer["max_epochs"], trainer["max_steps"], trainer["max_time"], embedded["data"]["batch_size"]) == (20, 11000, "00:00:08:00", 32)


def _run_task(task, monkeypatch) -> SystemExit:
    """`task` run as a Hydra entry point of conf/export.yaml would be: what the user sees when it fails."""
    from captioner.config import hydra_main

    monkeypatch.setattr(sys, "argv", ["captioner.export", "ckpt=x"])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exited:
        hydra_main("export")(task)()
    return exited.value


def test_bad_input_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    from captioner.models.mapper import build_mapper

    def refused(cfg):  # captioner refuses a value: one line naming it
        build_mapper("bogus", feature_dim=4, token_dim=4, num_tokens=1, embed_dim=4, prefix_length=1)

    def bug(cfg):  # a ValueError no check of captioner's raised: a bug, whose traceback is the report
        json.loads("{not json")

    assert _run_task(refused, monkeypatch).code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown mapper 'bogus'") and "Traceback" not in err, err
    assert _run_task(bug, monkeypatch).code == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "JSONDecodeError" in err and "json.loads" in err, err


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


def test_a_config_group_set_to_null_on_the_command_line_is_removed_as_in_a_defaults_list():
    from captioner.config import null_groups

    assert null_groups(["pretrain=null", "model/mapper=null", "ckpt_path=null", "model.decoder_lr=null", "data=coco"]) == \
        ["~pretrain", "~model/mapper", "ckpt_path=null", "model.decoder_lr=null", "data=coco"]
    done = command("-m", "captioner.train", "pretrain=null", "logger=null", "ckpt_path=null", "--cfg", "job", timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    composed = yaml.safe_load(done.stdout)
    assert "pretrain" not in composed and "logger" not in composed  # conf/pretrain/tiny.yaml: "pretrain=null skips them all"
    assert composed["ckpt_path"] is None and composed["model"]["decoder"] == "${pretrain.lm.out}"
