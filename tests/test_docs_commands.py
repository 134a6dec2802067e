"""The documentation is executable: every shell command of README.md and docs/**/*.md runs as typed, with only
the budget-shrinking overrides `tests/docs_commands.yaml` appends, in a working folder that holds what the docs
assume (a finished smoke run, an export, some photos). Commands that need a GPU, COCO or published weights must
stop within seconds with one line saying so. A command without an entry fails, and so does an entry without
a command."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, SHARED_DATA
from docs_commands import commands

SPEC = yaml.safe_load((Path(__file__).with_name("docs_commands.yaml")).read_text())
ENTRIES: dict[str, dict] = {k: v or {} for k, v in SPEC["commands"].items()}
DOCUMENTED = commands(ROOT)
SKIPPED = {"network": "it downloads; the tests never reach the internet",
           "cluster": "it needs SLURM or several GPU nodes",
           "full-size": "full-size models: minutes and ~10 GB (docs/results/speed.md has their figures)",
           "suite": "the test suite itself (.ci/run runs it)",
           "own-test": "a script with a test of its own that runs it whole (named in the page)"}
FAILS_FAST = ("gpu", "coco", "weights")


def test_every_documented_command_has_an_entry_and_every_entry_a_command():
    documented = {c for c, _ in DOCUMENTED}
    assert sorted(documented - set(ENTRIES)) == [], "documented commands without an entry in tests/docs_commands.yaml"
    assert sorted(set(ENTRIES) - documented) == [], "entries of tests/docs_commands.yaml no page documents"
    kinds = {"gpu", "coco", "weights", "server", "running-server", *SKIPPED}
    assert all(e.get("needs") in (None, *kinds) and e.get("tier") in (None, "slow") for e in ENTRIES.values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shell(command: str, world: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=world, env=world_env(world), capture_output=True, text=True,
                          timeout=timeout)


def world_env(world: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
               CAPTIONER_DATA_DIR=str(world / "data"), WANDB_MODE="offline", OMP_NUM_THREADS="2",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return env


def _venv(world: Path) -> None:
    """`.venv` as `make` leaves it: a virtualenv (this environment's packages through a .pth line, this checkout
    through PYTHONPATH) whose install stamp is newer than pyproject.toml, so `make` goes straight to its recipe."""
    venv = world / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for name in ("Makefile", "pyproject.toml"):
        (world / name).symlink_to(ROOT / name)
    (venv / ".installed").touch()


def _own_data(world: Path) -> None:
    """coco_mini as the docs' /d/: captions_{train,val,test}.json and images/{train,val,test}."""
    own, mini = world / "own", SHARED_DATA / "coco_mini"
    train = json.loads((mini / "annotations" / "captions_train2017_subset80.json").read_text())
    val = json.loads((mini / "annotations" / "captions_val2017_subset159.json").read_text())
    half = len(val["images"]) // 2
    for split, data, images in (("train", train, "train2017"), ("val", val, "val2017"), ("test", val, "val2017")):
        chosen = data["images"][:half] if split == "val" else data["images"][half:] if split == "test" else data["images"]
        ids = {i["id"] for i in chosen}
        part = {**data, "images": chosen, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}
        (own / "images").mkdir(parents=True, exist_ok=True)
        (own / f"captions_{split}.json").write_text(json.dumps(part))
        (own / "images" / split).symlink_to(mini / "images" / images)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The working folder every command runs in."""
    from PIL import Image

    world = tmp_path_factory.mktemp("docs")
    _venv(world)
    smoke = "outputs/train/runs/smoke"
    done = shell(f"python -m captioner.train experiment=smoke hydra.run.dir={smoke}", world, 900)
    assert done.returncode == 0, done.stderr[-3000:]
    done = shell(f"python -m captioner.export ckpt={smoke}/checkpoints/last.ckpt out=my_model", world, 600)
    assert done.returncode == 0, done.stderr[-3000:]
    scenes = sorted((world / "data" / "synthetic_smoke" / "images" / "test").glob("*.png"))[:3]
    (world / "photos").mkdir()
    (world / "more" / "x").mkdir(parents=True)
    for i, scene in enumerate(scenes):
        shutil.copy(scene, world / "photos" / scene.name)
        Image.open(scene).convert("RGB").save(world / "more" / "x" / f"{i}.jpg")
    shutil.copy(scenes[0], world / "a.png")
    shutil.copy(scenes[1], world / "other.png")
    Image.open(scenes[2]).convert("RGB").save(world / "photo.jpg")
    shutil.copy(world / smoke / "captions_test.json", world / "captions.json")
    shutil.copy(world / "data" / "synthetic_smoke" / "annotations" / "captions_test.json", world / "captions_val2017.json")
    shutil.copytree(world / smoke, world / "outputs" / "train" / "multiruns" / "sweep" / "0")
    if (SHARED_DATA / "coco_mini").is_dir():
        _own_data(world)
    return world


def typed(command: str, entry: dict) -> str:
    """The command as the harness types it: placeholders filled, the entry's overrides appended."""
    for placeholder, value in SPEC["placeholders"].items():
        command = command.replace(placeholder, value)
    if entry.get("dry_run"):
        return f"{command} --cfg job"
    return f"{command} {entry['append']}" if entry.get("append") else command


class Server:
    """A documented `serve` command running in the world, stopped on exit."""

    def __init__(self, command: str, world: Path, within: float):
        port = re.search(r"\bport=(\d+)", command)
        self.port = int(port.group(1)) if port else free_port()
        command = command if port else f"{command} port={self.port}"
        self.process = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=world, env=world_env(world),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as answer:
                    self.health = json.loads(answer.read())
                    return
            except OSError:
                time.sleep(1)
        self.stop()
        raise AssertionError(f"{command} was not healthy within {within} s:\n{self.process.stdout.read()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)


def params():
    for command, page in DOCUMENTED:
        entry = ENTRIES.get(command, {})
        marks = [pytest.mark.slow] if entry.get("tier") == "slow" else []
        if entry.get("known_failure"):
            marks.append(pytest.mark.xfail(reason=entry["known_failure"], strict=True))
        yield pytest.param(command, entry, id=f"{page}: {command[:90]}", marks=marks)


@pytest.mark.parametrize(("command", "entry"), list(params()))
def test_documented_command(command, entry, request):
    if command not in ENTRIES:
        pytest.fail(f"no entry in tests/docs_commands.yaml for {command!r}")
    needs = entry.get("needs")
    if needs in SKIPPED and not entry.get("dry_run"):
        pytest.skip(SKIPPED[needs])
    if "/d/" in command and not (SHARED_DATA / "coco_mini").is_dir():
        pytest.skip("../shared/data/coco_mini is absent")
    # the default tier (--help, --cfg job, what must fail at once) runs in an empty folder; the slow one in the world
    world = request.getfixturevalue("world") if entry.get("tier") == "slow" else request.getfixturevalue("tmp_path")
    line = typed(command, entry)
    if needs == "server":
        server = Server(line, world, entry.get("within", 180))
        server.stop()
        assert isinstance(server.health, dict) and server.health, server.health
        return
    if needs == "running-server":
        server = Server("python -m captioner.serve ckpt=my_model", world, entry.get("within", 180))
        try:
            done = shell(line.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}"), world, 300)
        finally:
            server.stop()
        assert done.returncode == 0 and len(json.loads(done.stdout)["results"]) == 2, done.stdout + done.stderr
        return
    if needs in FAILS_FAST:
        within = entry.get("within", 60)
        start = time.monotonic()
        done = shell(line, world, within + 60)
        took = time.monotonic() - start
        lines = [x for x in done.stderr.splitlines() if x.strip()]
        assert done.returncode != 0, f"{line} ran on a machine without {needs}"
        assert "Traceback" not in done.stderr and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
        assert re.search(entry.get("message", "."), lines[0]), lines[0]
        assert took < within, f"{line} took {took:.0f} s to fail"
        return
    done = shell(line, world, 1800)
    assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
