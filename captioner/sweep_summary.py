"""python -m captioner.sweep_summary DIR: one row per job of a multirun, best `val/cider` first.

Reads each job's `.hydra/overrides.yaml` (its swept values) and `metrics.json` (captioner/train.py)
and writes `summary.csv`, `summary.md` and `summary.png` (the metric against each swept value)
into DIR. Every multirun runs it when it ends (the `SweepSummary` callback in conf/hydra/default.yaml).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import yaml
from hydra.experimental.callback import Callback

METRIC = "val/cider"


def _value(text: str):
    parsed = yaml.safe_load(text)
    return parsed if isinstance(parsed, (int, float, bool)) or parsed is None else text


def _sweep_keys(sweep_dir: Path) -> set[str]:
    """Keys the sweep was asked to vary: the sweeper's `params` and command-line sweeps (`a=1,2`, `choice(...)`)."""
    multirun = Path(sweep_dir) / "multirun.yaml"
    if not multirun.is_file():
        return set()
    hydra = (yaml.safe_load(multirun.read_text()) or {}).get("hydra", {})
    keys = set((hydra.get("sweeper") or {}).get("params") or {})
    for override in (hydra.get("overrides") or {}).get("task") or []:
        key, _, value = override.partition("=")
        if "," in value or "(" in value:
            keys.add(key.lstrip("+~"))
    return keys


def collect(sweep_dir: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """(table, swept keys): one row per job folder that has `.hydra/overrides.yaml`."""
    rows = []
    for overrides in sorted(Path(sweep_dir).glob("*/.hydra/overrides.yaml")):
        job = overrides.parent.parent
        values = dict(o.split("=", 1) for o in yaml.safe_load(overrides.read_text()) or [])
        metrics_file = job / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        rows.append({"job": job.name, **{k.lstrip("+~"): _value(v) for k, v in values.items()}, **metrics})
    if not rows:
        raise FileNotFoundError(f"{sweep_dir} holds no multirun jobs (no */.hydra/overrides.yaml): pass a sweep directory")
    table = pd.DataFrame(rows)
    override_keys = {k.lstrip("+~") for o in Path(sweep_dir).glob("*/.hydra/overrides.yaml") for k in
                     dict(x.split("=", 1) for x in yaml.safe_load(o.read_text()) or [])}
    swept = [k for k in table.columns if k in override_keys and (k in _sweep_keys(sweep_dir) or table[k].astype(str).nunique() > 1)]
    if METRIC not in table:
        table[METRIC] = float("nan")  # jobs that failed or never validated still get their row
    table = table.sort_values(METRIC, ascending=False, na_position="last").reset_index(drop=True)
    metrics = [c for c in table.columns if "/" in c and c not in override_keys]
    others = [c for c in table.columns if c not in {"job", *swept, *metrics}]
    return table[["job", *swept, METRIC, *[m for m in metrics if m != METRIC], *others]], swept


def markdown(table: pd.DataFrame) -> str:
    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def plot(table: pd.DataFrame, swept: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(len(swept), 1), figsize=(4 * max(len(swept), 1), 3.2), squeeze=False)
    for ax, key in zip(axes[0], swept or ["job"]):
        values = pd.to_numeric(table[key], errors="coerce")
        x = values if values.notna().all() else table[key].astype(str)
        ax.scatter(x, table[METRIC], alpha=0.7)
        ax.set(xlabel=key, ylabel=METRIC)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize(sweep_dir: str | Path) -> pd.DataFrame:
    sweep_dir = Path(sweep_dir)
    table, swept = collect(sweep_dir)
    table.to_csv(sweep_dir / "summary.csv", index=False)
    (sweep_dir / "summary.md").write_text(markdown(table))
    plot(table, swept, sweep_dir / "summary.png")
    return table


class SweepSummary(Callback):
    """Hydra callback: summarise the sweep directory when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        try:
            table = summarize(config.hydra.sweep.dir)
        except FileNotFoundError as error:  # e.g. every job failed before writing anything
            print(f"no sweep summary: {error}")
            return
        print(f"sweep summary ({len(table)} jobs, best {METRIC} first): {config.hydra.sweep.dir}/summary.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a multirun directory, e.g. outputs/train/multiruns/<time>_<id>")
    table = summarize(parser.parse_args().sweep_dir)
    print(markdown(table), end="")


if __name__ == "__main__":
    main()
