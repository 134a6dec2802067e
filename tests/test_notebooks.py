"""The notebooks run top to bottom against the embedded model, and are stored without outputs."""

from __future__ import annotations

import json

import nbformat
import pytest
import yaml
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_both_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "analysis"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs before committing"


@pytest.fixture
def ablation_runs(tmp_path, embedded_ckpt):
    """Two scored runs that differ in their mapper, as `python -m captioner.train -m model/mapper=...` writes them."""
    config = yaml.safe_load((embedded_ckpt.parents[1] / "config.yaml").read_text())
    for mapper, cider in (("mlp", 0.4), ("attention", 0.6)):
        run = tmp_path / "runs" / mapper
        run.mkdir(parents=True)
        config["model"]["mapper"]["name"] = mapper
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        (run / "scores.json").write_text(json.dumps({"model": {"Bleu_4": 0.1, "ROUGE_L": 0.3, "CIDEr": cider}}))
    return tmp_path / "runs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, embedded_ckpt, ablation_runs, monkeypatch):
    monkeypatch.setenv("CAPTIONER_CKPT", str(embedded_ckpt))  # the kernel inherits this environment
    monkeypatch.setenv("CAPTIONER_RUNS", str(ablation_runs))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "display_data" and "image/png" in o.get("data", {}) for o in outputs), "no figure drawn"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert str(embedded_ckpt) in text
    if path.stem == "analysis":
        html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
        assert "attention" in html and "mlp" in html  # the ablation table, one row per mapper
