"""Decoding speed on CPU: ours (KV cache, batched, fp32 and int8) vs a ClipCap-style loop and HF generate.

    python bench/decode.py                       # full-size ViT-B/32 + GPT-2 124M, random weights, 2 threads
    python bench/decode.py --ckpt /work/trained/embedded.ckpt   # also: int8 and bf16 vs fp32 captions of a trained model

Every method runs in this process on the same random model and image, writes exactly
`--tokens` new tokens (end-of-text suppressed everywhere: a random GPT-2 would never say it
anyway) and is timed end to end, image pixels to caption, median of `--runs` after one warm-up.
The ClipCap-style loop is rmokady/CLIP_prefix_caption's `generate_beam` / `generate2`: one image
at a time, the whole sequence recomputed at every step (no KV cache). It is written out here
because transformers 5's `generate(use_cache=False)` still caches.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioner.generate import Decoding, generate_ids  # noqa: E402
from captioner.module import CaptionModule  # noqa: E402
from captioner.quantize import quantize_module  # noqa: E402

VIT_B32 = dict(  # clip.model.CLIP(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12): OpenAI's ViT-B/32
    embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
    context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12,
)


@torch.inference_mode()
def clipcap_beam(module, pixels: torch.Tensor, eos: int, tokens: int, beam_size: int = 5) -> list[int]:
    """ClipCap's `generate_beam` for one image (no cache; scores averaged over length), end-of-text suppressed."""
    gpt = module.decoder
    generated = module.prefix({"pixels": pixels})  # (1, P, D)
    scores, seqs, seq_lengths = None, None, torch.ones(beam_size)
    for _ in range(tokens):
        logits = gpt(inputs_embeds=generated).logits[:, -1, :]  # the whole sequence, every step
        logits = logits.softmax(-1).log()
        logits[:, eos] = -float("inf")
        if scores is None:
            scores, next_tokens = logits.topk(beam_size, -1)
            generated = generated.expand(beam_size, *generated.shape[1:])
            next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)  # (K, 1), (K,)
            seqs = next_tokens
        else:
            scores_sum = scores[:, None] + logits  # (K, V)
            seq_lengths += 1
            average, flat = (scores_sum / seq_lengths[:, None]).view(-1).topk(beam_size, -1)
            source = flat // scores_sum.shape[1]
            seq_lengths = seq_lengths[source]
            next_tokens = (flat % scores_sum.shape[1]).unsqueeze(1)  # (K, 1)
            seqs = torch.cat((seqs[source], next_tokens), dim=1)
            generated = generated[source]
            scores = average * seq_lengths
        embed = gpt.transformer.wte(next_tokens.squeeze(1)).view(generated.shape[0], 1, -1)  # (K, 1, D)
        generated = torch.cat((generated, embed), dim=1)
    best = (scores / seq_lengths).argmax()
    return seqs[best].tolist()


@torch.inference_mode()
def clipcap_greedy(module, pixels: torch.Tensor, eos: int, tokens: int) -> list[int]:
    """ClipCap's `generate2` (greedy) for one image, no cache, end-of-text suppressed."""
    gpt = module.decoder
    generated = module.prefix({"pixels": pixels})  # (1, P, D)
    out = []
    for _ in range(tokens):
        logits = gpt(inputs_embeds=generated).logits[:, -1, :]
        logits[:, eos] = -float("inf")
        next_token = logits.argmax(-1)  # (1,)
        out.append(int(next_token))
        generated = torch.cat((generated, gpt.transformer.wte(next_token)[:, None]), dim=1)  # (1, T+1, D)
    return out


@torch.inference_mode()
def ours(module, pixels: torch.Tensor, decoding: Decoding) -> list[list[int]]:
    return generate_ids(module.decoder, module.tokenizer, module.prefix({"pixels": pixels}), decoding)


WARMUP = 1  # untimed first calls per method (--warmup)


def median_seconds(fn, runs: int) -> tuple[float, object]:
    for _ in range(WARMUP):  # first-call allocations stay out of the numbers
        fn()
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def latency_table(module, int8, pixels, eos, args, console) -> dict[str, float]:
    """Batch-1 latency, beam 5 and greedy, every method."""
    results = {}
    for strategy in ("beam", "greedy"):
        d = Decoding(strategy, num_beams=5, max_new_tokens=args.tokens, min_new_tokens=args.tokens, length_penalty=1.0)
        hf = dataclasses.replace(d, engine="hf")
        clipcap = (lambda: clipcap_beam(module, pixels, eos, args.tokens)) if strategy == "beam" else (lambda: clipcap_greedy(module, pixels, eos, args.tokens))
        methods = {
            "ClipCap-style loop (no cache)": clipcap,
            "HF generate (cache), fp32": lambda: ours(module, pixels, hf)[0],
            "ours (cache), fp32": lambda: ours(module, pixels, d)[0],
            "HF generate (cache), int8": lambda: ours(int8, pixels, hf)[0],
            "ours (cache), int8": lambda: ours(int8, pixels, d)[0],
        }
        times, outputs = {}, {}
        for name, fn in methods.items():
            times[name], outputs[name] = median_seconds(fn, args.runs)
            console.print(f"  {strategy}: {name}: {times[name]:.3f} s", style="dim")
        reference = outputs["HF generate (cache), fp32"]
        t = Table(title=f"{strategy}{' 5' if strategy == 'beam' else ''}, batch 1, {args.tokens} new tokens: latency image -> caption (median of {args.runs})")
        for column in ("method", "seconds", "x ClipCap loop", "x HF generate fp32", "same tokens as HF fp32"):
            t.add_column(column, justify="left" if column == "method" else "right")
        for name, seconds in times.items():
            same = "yes" if outputs[name] == reference else "no"
            t.add_row(name, f"{seconds:.3f}", f"{seconds / times['ClipCap-style loop (no cache)']:.3f}", f"{seconds / times['HF generate (cache), fp32']:.3f}", same)
        console.print(t)
        fastest = min(("ours (cache), fp32", "ours (cache), int8"), key=times.get)
        results[f"{strategy}/fastest_vs_clipcap"] = times[fastest] / times["ClipCap-style loop (no cache)"]
        results[f"{strategy}/fastest_vs_hf"] = times[fastest] / times["HF generate (cache), fp32"]
    return results


def throughput_table(module, int8, images, eos, args, console) -> None:
    """Batched greedy over all images vs ClipCap's per-image loop (timed on `--loop-images` of them:
    a per-image loop's time is linear in the number of images)."""
    d = Decoding("greedy", max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    few = images[: args.loop_images]
    loop_s, _ = median_seconds(lambda: [clipcap_greedy(module, im[None], eos, args.tokens) for im in few], args.runs)
    rates = {f"ClipCap-style per-image loop ({len(few)} images timed)": len(few) / loop_s}
    for name, model in (("ours, batched, fp32", module), ("ours, batched, int8", int8)):
        seconds, _ = median_seconds(lambda: ours(model, images, d), args.runs)
        rates[f"{name} ({len(images)} images)"] = len(images) / seconds
        console.print(f"  throughput: {name}: {seconds:.3f} s for {len(images)}", style="dim")
    t = Table(title=f"greedy throughput, {args.tokens} new tokens, encoder included (median of {args.runs})")
    for column in ("method", "images / s", "x per-image loop"):
        t.add_column(column, justify="left" if column == "method" else "right")
    base = next(iter(rates.values()))
    for name, rate in rates.items():
        t.add_row(name, f"{rate:.3f}", f"{rate / base:.1f}")
    console.print(t)


def agreement(ckpt: str, console: Console, batch_size: int) -> None:
    """Share of test images whose int8 (and bf16) caption equals the fp32 caption, trained model, CPU.
    Captions come from the stored CLIP features, as in evaluation: bf16 here is GPT-2's precision."""
    from captioner.api import Captioner
    from captioner.evaluate import datamodule_for
    from captioner.results import caption_split

    exact = Captioner.from_pretrained(ckpt)
    reduced = {"int8": Captioner.from_pretrained(ckpt, int8=True), "bf16": Captioner.from_pretrained(ckpt, precision="bf16")}
    datamodule = datamodule_for(ckpt, "test", {"eval_batch_size": batch_size})
    t = Table(title=f"int8 and bf16 vs fp32 captions on the test split of {ckpt}")
    for column in ("decoding", "images", *(f"{name} identical" for name in reduced), *(f"{name} %" for name in reduced)):
        t.add_column(column, justify="left" if column == "decoding" else "right")
    for d in (Decoding("greedy", max_new_tokens=30), Decoding("beam", num_beams=3, max_new_tokens=30)):
        fp32 = caption_split(exact, datamodule, "test", d)
        same = {}
        for name, captioner in reduced.items():
            captions = caption_split(captioner, datamodule, "test", d)
            same[name] = sum(fp32[i] == captions[i] for i in fp32)
            for i in [i for i in fp32 if fp32[i] != captions[i]][:3]:
                console.print(f"  {name} differs on {i}: fp32 {fp32[i]!r} | {name} {captions[i]!r}", style="dim")
        name = d.strategy + (f" {d.num_beams}" if d.strategy == "beam" else "")
        t.add_row(name, str(len(fp32)), *(str(n) for n in same.values()), *(f"{100 * n / len(fp32):.1f}" for n in same.values()))
    console.print(t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per method (median); >= 5 for reported numbers")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per method before the timed ones")
    parser.add_argument("--tokens", type=int, default=20, help="new tokens per caption, exactly")
    parser.add_argument("--images", type=int, default=64, help="batch for the greedy throughput")
    parser.add_argument("--loop-images", type=int, default=4, help="images timed through the per-image loop")
    parser.add_argument("--prefix-length", type=int, default=40, help="the paper's prefix (experiment=coco_attn)")
    parser.add_argument("--mapper-layers", type=int, default=8)
    parser.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "data" / "gpt2_tokenizer"), help="GPT-2's vocab.json + merges.txt")
    parser.add_argument("--ckpt", help="a trained checkpoint: report int8 and bf16 vs fp32 caption agreement on its test split")
    parser.add_argument("--skip-speed", action="store_true", help="only the --ckpt agreement")
    parser.add_argument("--only", choices=["latency", "throughput"], help="run one of the two speed tables")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global WARMUP
    WARMUP = args.warmup
    console = Console()
    if not args.skip_speed:
        if not (Path(args.tokenizer) / "vocab.json").is_file():
            sys.exit(f"GPT-2's tokenizer files are not in {args.tokenizer}: pass --tokenizer DIR (vocab.json + merges.txt)")
        torch.manual_seed(0)
        module = CaptionModule(
            encoder=VIT_B32, decoder={}, tokenizer=args.tokenizer, prefix_length=args.prefix_length,
            mapper={"name": "attention", "num_layers": args.mapper_layers},
        ).eval()  # GPT2Config() defaults: GPT-2 124M
        int8 = quantize_module(module)
        eos = module.tokenizer.eos_token_id
        images = torch.randn(args.images, 3, 224, 224)  # (B, 3, H, W) normalised pixels
        console.print(f"ViT-B/32 + GPT-2 124M (random), attention mapper {args.mapper_layers} layers, prefix {args.prefix_length}, "
                      f"{torch.get_num_threads()} threads, torch {torch.__version__}")
        if args.only != "throughput":
            results = latency_table(module, int8, images[:1], eos, args, console)
            console.print({k: round(v, 3) for k, v in results.items()})
        if args.only != "latency":
            throughput_table(module, int8, images, eos, args, console)
    if args.ckpt:
        agreement(args.ckpt, console, batch_size=100)


if __name__ == "__main__":
    main()
