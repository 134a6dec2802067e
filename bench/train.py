"""Training throughput over cached CLIP features: ours (CaptionModule under Lightning) vs ClipCap's loop.

    python bench/train.py                       # both ClipCap COCO settings, CPU, coco_mini captions
    python bench/train.py --setting mlp --windows 5 --rounds 1
    python bench/train.py --device cuda         # on a GPU machine (unmeasured here: no GPU was available)

ClipCap's two COCO settings, at equal model (GPT-2 124M, random weights: the same FLOPs as the
pretrained one) and batch (40), on coco_mini's 1,195 real captions with GPT-2's real tokenizer and
random 512-d "CLIP" features (the mappers read the pooled vector; its values do not change the cost):
- `mlp`: ClipCap's MLP mapper, prefix 10, GPT-2 fine-tuned;
- `transformer`: ClipCap's transformer mapper (8 layers), prefix = clip length = 40, GPT-2 frozen.

ClipCap (bench/clipcap.py): its dataset's global-maximum padding, its loader, its for-loop AdamW and
schedule, fp32; frozen by hiding GPT-2 from `parameters()`, so GPT-2's weight gradients are still
computed. Ours: the real CaptionDataModule over a feature store (padding to each batch's longest
caption, `length_buckets=50`), the real CaptionModule (`requires_grad_(False)` freezing, `adamw`
foreach on CPU / fused on CUDA), Lightning's Trainer with bf16-mixed where the CPU runs bf16
natively (AMX / AVX512-BF16) or on CUDA, and gradient clipping as in conf/trainer/cpu.yaml.

Each method runs in its own process (so its peak RSS is its own), twice per setting in the order
ClipCap, ours, ours, ClipCap (load on a shared machine falls on both alike). A process builds the
model, runs `--warmup` untimed steps, counts the FLOPs and bytes of `--count` steps (bench/roofline.py),
then times `--windows` windows of `--window-steps` steps. Reported: medians over all windows of
captions/s and caption tokens/s (real tokens, end-of-text and padding not counted, so both methods
count the same), the peak RSS, and the share of the probed peak the median window reached.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import roofline
from memory import peak_rss_kib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
ENCODER = dict(  # only embed_dim matters: training reads cached 512-d features (ViT-B/32's), never an image
    embed_dim=512, image_resolution=224, vision_layers=1, vision_width=64, vision_patch_size=32,
    context_length=16, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1,
)
SETTINGS = {  # ClipCap's COCO settings
    "mlp": dict(mapper="mlp", prefix_length=10, clip_length=None, frozen=False),
    "transformer": dict(mapper="transformer", prefix_length=40, clip_length=40, frozen=True),
}
BATCH = 40


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- the data both methods read ------------------------------------------------------------------
def write_data(root: Path) -> dict:
    """coco_mini's captions as a COCO-format split + a complete feature store of random 512-d features."""
    from captioner.data.coco import load_coco
    from captioner.data.features import describe, identity_hash, store_key

    karpathy = json.loads((SHARED / "coco_mini" / "annotations" / "dataset_coco_mini_karpathy_format.json").read_text())
    images = [{"id": im["cocoid"], "file_name": f"{im['filepath']}/{im['filename']}"} for im in karpathy["images"]]
    annotations = [{"id": s["sentid"], "image_id": im["cocoid"], "caption": s["raw"]} for im in karpathy["images"] for s in im["sentences"]]
    path = root / "captions_train.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    records = load_coco(path, root / "images")
    features = np.random.default_rng(0).standard_normal((len(records), 512), dtype=np.float32).astype(np.float16)
    split = {"annotations": str(path), "images": str(root / "images")}
    for name in ("train", "val"):  # val: the DataModule's second split (never run: limit_val_batches=0)
        store = root / "features" / f"{name}-{store_key(identity_hash(records), ENCODER)}"  # the name the DataModule looks for
        store.mkdir(parents=True)
        np.save(store / "clip_features.npy", features)
        manifest = {**describe(records, ENCODER, "fp32", 224, name, "fp16", False), "skipped": []}
        (store / "manifest.json").write_text(json.dumps(manifest))
    return {"train": split, "val": split}


# ---- the two methods, each in a child process ----------------------------------------------------
class Windows:
    """Step bookkeeping shared by both methods: warm-up, counted steps, timed windows."""

    def __init__(self, args):
        self.args, self.times, self.tokens, self.works = args, [], [], []
        self.counter = None
        self._start, self._tokens = 0.0, 0

    def before(self, step: int, tokens: int) -> None:
        a = self.args
        if step == a.warmup:
            self.counter = roofline.count()
            self.counter.__enter__()
        timed = step - a.warmup - a.count
        if timed >= 0 and timed % a.window_steps == 0:
            sync(a.device)
            self._start, self._tokens = time.perf_counter(), 0
        self._tokens += tokens

    def after(self, step: int) -> None:
        a = self.args
        if step == a.warmup + a.count - 1:
            self.counter.__exit__(None, None, None)
            self.works.append(self.counter.work.scaled(1 / a.count))
        timed = step - a.warmup - a.count + 1
        if timed > 0 and timed % a.window_steps == 0:
            sync(a.device)
            self.times.append(time.perf_counter() - self._start)
            self.tokens.append(self._tokens)

    @property
    def steps(self) -> int:
        a = self.args
        return a.warmup + a.count + a.windows * a.window_steps

    def result(self, **extra) -> dict:
        work = self.works[0]
        return {"times": self.times, "tokens": self.tokens, "flops": dict(work.flops), "bytes": work.bytes,
                "peak_rss_mib": peak_rss_kib() / 1024, **extra}


def run_clipcap(args, setting: dict, splits: dict) -> dict:
    import clipcap
    from transformers import GPT2Config, GPT2LMHeadModel

    from captioner.data.coco import load_coco
    from captioner.models.decoder import load_tokenizer

    tokenizer = load_tokenizer(str(SHARED / "gpt2_tokenizer"))
    records = load_coco(Path(splits["train"]["annotations"]), Path(splits["train"]["images"]))
    tokens, index = [], []
    for i, record in enumerate(records):  # ClipCap's parse_coco order: one prefix per image, each caption points at it
        for caption in record.captions:
            tokens.append(tokenizer.encode(caption))
            index.append(i)
    store = next((Path(args.root) / "features").glob("train-*"))
    prefixes = torch.from_numpy(np.load(store / "clip_features.npy")).float()  # ClipCap's pickle: all in RAM
    p = setting["prefix_length"]
    dataset = clipcap.ClipCocoDataset(tokens, index, prefixes, p)
    torch.manual_seed(0)
    cls = clipcap.ClipCaptionPrefix if setting["frozen"] else clipcap.ClipCaptionModel
    model = cls(GPT2LMHeadModel(GPT2Config()), p, clip_length=setting["clip_length"], prefix_size=512, mapping_type=setting["mapper"])
    model = model.to(args.device).train()
    loader, optimizer, scheduler = clipcap.loader_and_optimizer(dataset, model, BATCH, steps=10 * len(dataset) // BATCH)
    windows = Windows(args)
    batches = iter(loader)
    for step in range(windows.steps):
        batch = next(batches)
        windows.before(step, int(batch[1][:, p:].sum()))  # real caption tokens (ClipCap has no end-of-text)
        clipcap.train_step(model, batch, optimizer, scheduler, p, args.device)
        windows.after(step)
    return windows.result(sequence=p + dataset.max_seq_len, precision="fp32", optimizer="AdamW for-loop")


def run_ours(args, setting: dict, splits: dict) -> dict:
    import lightning as L

    from captioner.api import native_bf16
    from captioner.data.datamodule import CaptionDataModule
    from captioner.module import CaptionModule

    cuda = args.device.startswith("cuda")
    tokenizer = str(SHARED / "gpt2_tokenizer")
    datamodule = CaptionDataModule(
        splits, ENCODER, tokenizer, str(Path(args.root) / "features"), batch_size=BATCH, eval_batch_size=BATCH,
        max_tokens=64, patch_tokens=False, length_buckets=50, pin_memory=cuda,  # 64: no caption is cut, as in ClipCap
    )
    mapper = {"name": setting["mapper"]}
    if setting["clip_length"]:
        mapper["clip_length"] = setting["clip_length"]
    adamw = "fused" if cuda or args.fused else "foreach"
    module = CaptionModule(
        encoder=ENCODER, decoder={}, tokenizer=tokenizer, mapper=mapper, prefix_length=setting["prefix_length"],
        freeze_decoder=setting["frozen"], normalize_features=False, lr=2e-5, warmup_steps=5000, val_cider_images=0,
        adamw=adamw, compile=args.compile,
    )
    bf16 = cuda or native_bf16()
    windows = Windows(args)
    sequences = []

    class Hooks(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            mask = batch["attention_mask"]
            sequences.append(mask.shape[1] + setting["prefix_length"])
            windows.before(batch_idx, int(mask.sum()) - len(mask))  # real caption tokens: end-of-text not counted

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            windows.after(batch_idx)

    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed" if bf16 else "32-true",
        max_steps=windows.steps, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Hooks()],
    )
    trainer.fit(module, datamodule=datamodule)
    return windows.result(sequence=round(statistics.mean(sequences), 1), precision="bf16-mixed" if bf16 else "fp32",
                          optimizer=f"AdamW {adamw}" + (", compiled" if args.compile else ""))


# ---- the parent: data, probe, alternating children, table ----------------------------------------
def child(args, method: str, setting: str, root: Path) -> dict:
    command = [sys.executable, __file__, "--child", method, "--setting", setting, "--root", str(root), "--device", args.device,
               "--warmup", str(args.warmup), "--count", str(args.count), "--windows", str(args.windows),
               "--window-steps", str(args.window_steps), "--threads", str(args.threads)]
    command += ["--fused"] * args.fused + ["--compile"] * args.compile
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        sys.exit(f"error: the {method} {setting} run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(runs: list[dict], args) -> dict:
    times = [t for r in runs for t in r["times"]]
    rates = [tok / t for r in runs for tok, t in zip(r["tokens"], r["times"])]
    seconds = statistics.median(times)
    work = roofline.Work(bytes=runs[0]["bytes"] * args.window_steps)
    for k, v in runs[0]["flops"].items():
        work.flops[k] = v * args.window_steps
    return {"captions/s": BATCH * args.window_steps / seconds, "tokens/s": statistics.median(rates), "seconds": seconds,
            "windows": len(times), "rss": max(r["peak_rss_mib"] for r in runs), "work": work, **{k: runs[0][k] for k in ("sequence", "precision", "optimizer")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", nargs="+", choices=sorted(SETTINGS), default=["mlp", "transformer"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--rounds", type=int, default=2, help="processes per method and setting, alternating ClipCap/ours")
    parser.add_argument("--windows", type=int, default=3, help="timed windows per process (>= 5 in all for reported numbers)")
    parser.add_argument("--window-steps", type=int, default=1, help="optimizer steps per timed window")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--count", type=int, default=2, help="steps whose FLOPs and bytes are counted (untimed)")
    parser.add_argument("--fused", action="store_true", help="ours: fused AdamW on CPU too (CUDA always)")
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile GPT-2 and the mapper")
    parser.add_argument("--child", choices=["clipcap", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no GPU here: run on a GPU machine or drop --device")
    torch.set_num_threads(args.threads)
    if args.child:
        splits = json.loads((Path(args.root) / "splits.json").read_text())
        run = run_clipcap if args.child == "clipcap" else run_ours
        print(json.dumps(run(args, SETTINGS[args.setting[0]], splits)))
        return
    if not (SHARED / "coco_mini").is_dir() or not (SHARED / "gpt2_tokenizer" / "vocab.json").is_file():
        sys.exit(f"error: bench/train.py reads coco_mini's captions and GPT-2's tokenizer from {SHARED}")

    console = Console(width=160)
    peak = roofline.probe(args.device)
    console.print(peak.line())
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        (root / "splits.json").write_text(json.dumps(write_data(root)))
        for setting in args.setting:
            runs = {"clipcap": [], "ours": []}
            order = [m for r in range(args.rounds) for m in (("clipcap", "ours") if r % 2 == 0 else ("ours", "clipcap"))]
            for method in order:
                with console.status(f"{setting}: {method} ({len(runs[method]) + 1}/{args.rounds})"):
                    runs[method].append(child(args, method, setting, root))
                last = runs[method][-1]
                console.print(f"  {setting} {method}: windows {', '.join(f'{t:.2f}' for t in last['times'])} s, "
                              f"peak RSS {last['peak_rss_mib']:.0f} MiB", style="dim")
            results[setting] = {m: summary(r, args) for m, r in runs.items()}
    report(console, results, peak, args)


def report(console: Console, results: dict, peak, args) -> None:
    where = peak.device if args.device != "cpu" else f"CPU, {args.threads} threads"
    table = Table(title=f"training throughput, batch {BATCH}, GPT-2 124M, cached features, {where} (median of windows; higher is better)")
    for column in ("setting", "method", "sequence P+S", "precision", "optimizer", "windows", "captions/s", "tokens/s", "x ClipCap",
                   "peak RSS MiB", *roofline.COLUMNS):
        table.add_column(column, justify="left" if column in ("setting", "method", "precision", "optimizer") else "right")
    verdicts = []
    for setting, methods in results.items():
        base = methods["clipcap"]["tokens/s"]
        for method, r in methods.items():
            name = "ClipCap loop (global-max padding)" if method == "clipcap" else "ours (Lightning, per-batch padding, buckets)"
            table.add_row(setting, name, f"{r['sequence']}", r["precision"], r["optimizer"], str(r["windows"]), f"{r['captions/s']:.2f}",
                          f"{r['tokens/s']:.1f}", f"{r['tokens/s'] / base:.2f}x", f"{r['rss']:.0f}", *r["work"].cells(r["seconds"], peak))
        ratio = methods["ours"]["tokens/s"] / base
        verdicts.append(f"target {setting}: ours >= 2x ClipCap's tokens/s -> {ratio:.2f}x: {'PASS' if ratio >= 2 else 'FAIL'}")
    console.print(table)
    for line in verdicts:
        console.print(line)


if __name__ == "__main__":
    main()
