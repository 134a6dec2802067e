"""Decoding speed on CPU: ours (KV cache, batched; fp32, prepacked fp32, int8, ONNX Runtime) vs a ClipCap-style loop and HF generate.

    python bench/decode.py                       # full-size ViT-B/32 + GPT-2 124M, random weights, 2 threads
    python bench/decode.py --decoder smollm2-135m  # the same with a Llama decoder of SmolLM2-135M's shape
    python bench/decode.py --decoder smollm2-135m --only latency --runs 3 --no-onnx --no-clipcap   # quick: ours vs HF generate
    python bench/decode.py --ckpt /work/trained/embedded.ckpt   # also: int8 and bf16 vs fp32 captions of a trained model

Every method runs in this process on the same random model and image, writes exactly
`--tokens` new tokens (end-of-text suppressed everywhere: a random GPT-2 would never say it
anyway) and is timed end to end, image pixels to caption, median of `--runs` after one warm-up.
The ClipCap-style loop is rmokady/CLIP_prefix_caption's `generate_beam` / `generate2`: one image
at a time, the whole sequence recomputed at every step (no KV cache). It is written out here
because transformers 5's `generate(use_cache=False)` still caches.
The ONNX Runtime row runs the same model's graphs (captioner/onnx_graphs.py, exported here into a
temporary folder) through the same decoding loop (captioner/onnx_runtime.py); its share of the peak
is the PyTorch fp32 method's counted work over its own time (the dispatch counter sees no ORT kernel).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import roofline  # noqa: E402  (bench/, beside this file)
from captioner.generate import Decoding, generate_ids  # noqa: E402
from captioner.module import CaptionModule  # noqa: E402
from captioner.prepack import available as prepack_available, prepack_module  # noqa: E402
from captioner.quantize import quantize_module  # noqa: E402

VIT_B32 = dict(  # clip.model.CLIP(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12): OpenAI's ViT-B/32
    embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
    context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12,
)

# full-size decoders with random weights (captioner/models/decoder.py mappings); the vocabulary is
# GPT-2's tokenizer's (50257 tokens; SmolLM2's own has 49152)
DECODERS = {
    "gpt2-124m": {},  # GPT2Config() defaults: GPT-2 124M
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
                     "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
}


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
        embed = gpt.get_input_embeddings()(next_tokens.squeeze(1)).view(generated.shape[0], 1, -1)  # (K, 1, D)
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
        generated = torch.cat((generated, gpt.get_input_embeddings()(next_token)[:, None]), dim=1)  # (1, T+1, D)
    return out


@torch.inference_mode()
def ours(module, pixels: torch.Tensor, decoding: Decoding) -> list[list[int]]:
    return generate_ids(module.decoder, module.tokenizer, module.prefix({"pixels": pixels}), decoding)


WARMUP = 1  # untimed first calls per method (--warmup)
PACKED = "ours, prepacked, fp32 (the API's fp32 CPU default)"
ONNX = "ONNX Runtime, fp32 (same loop, work counted as ours fp32)"
CLIPCAP = "ClipCap-style loop (no cache)"


def onnx_graphs(module, threads: int):
    """`module` exported to ONNX in a temporary folder and loaded into ONNX Runtime sessions (CPU)."""
    import tempfile

    from captioner.onnx_graphs import export_onnx
    from captioner.onnx_runtime import OnnxGraphs

    folder = export_onnx(module, tempfile.mkdtemp(prefix="captioner-onnx-bench-"))
    return OnnxGraphs(folder, "cpu", threads)


@torch.inference_mode()
def ours_onnx(graphs, tokenizer, pixels: torch.Tensor, decoding: Decoding) -> list[list[int]]:
    return generate_ids(graphs.decoder, tokenizer, graphs.mapper(graphs.features({"pixels": pixels})), decoding)


def interleaved(methods: dict, runs: int, device: str) -> tuple[dict[str, float], dict[str, object]]:
    """Median seconds and last output per method, the methods taking turns run by run, so that
    a change in load on a shared machine falls on all of them alike."""
    for fn in methods.values():  # first-call allocations stay out of the numbers
        for _ in range(WARMUP):
            fn()
    times, outputs = {name: [] for name in methods}, {}
    for _ in range(runs):
        for name, fn in methods.items():
            roofline._sync(device)
            start = time.perf_counter()
            outputs[name] = fn()
            roofline._sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def latency_table(module, int8, packed, onnx, pixels, eos, args, console, peak) -> dict[str, float]:
    """Batch-1 latency, beam 5 and greedy, every method."""
    results = {}
    for strategy in ("beam", "greedy"):
        d = Decoding(strategy, num_beams=5, max_new_tokens=args.tokens, min_new_tokens=args.tokens, length_penalty=1.0)
        hf, dynamic = dataclasses.replace(d, engine="hf"), dataclasses.replace(d, kv_cache="dynamic")
        clipcap = (lambda: clipcap_beam(module, pixels, eos, args.tokens)) if strategy == "beam" else (lambda: clipcap_greedy(module, pixels, eos, args.tokens))
        methods = {
            **({CLIPCAP: clipcap} if args.clipcap else {}),
            "HF generate (cache), fp32": lambda: ours(module, pixels, hf)[0],
            "ours, DynamicCache, fp32": lambda: ours(module, pixels, dynamic)[0],
            "ours, preallocated cache, fp32": lambda: ours(module, pixels, d)[0],
        }
        if packed is not None:
            methods[PACKED] = lambda: ours(packed, pixels, d)[0]
        if int8 is not None:
            methods["HF generate (cache), int8"] = lambda: ours(int8, pixels, hf)[0]
            methods["ours, preallocated cache, int8"] = lambda: ours(int8, pixels, d)[0]
        if onnx is not None:
            methods[ONNX] = lambda: ours_onnx(onnx, module.tokenizer, pixels, d)[0]
        with console.status(f"{strategy}: {len(methods)} methods x {args.runs} runs, interleaved"):
            times, outputs = interleaved(methods, args.runs, args.device)
            works = {name: roofline.measure(fn) for name, fn in methods.items() if name != ONNX}
            if onnx is not None:  # the same model and tokens: the same work as ours in PyTorch fp32
                works[ONNX] = works["ours, preallocated cache, fp32"]
        reference = outputs["HF generate (cache), fp32"]
        t = Table(title=f"{strategy}{' 5' if strategy == 'beam' else ''}, batch 1, {args.tokens} new tokens: latency image -> caption (median of {args.runs}, interleaved)")
        for column in ("method", "seconds", "x ClipCap loop", "x HF generate fp32", "same tokens as HF fp32", *roofline.COLUMNS):
            t.add_column(column, justify="left" if column == "method" else "right")
        for name, seconds in times.items():
            same = "yes" if outputs[name] == reference else "no"
            versus_loop = f"{seconds / times[CLIPCAP]:.3f}" if CLIPCAP in times else "-"
            t.add_row(name, f"{seconds:.3f}", versus_loop, f"{seconds / times['HF generate (cache), fp32']:.3f}",
                      same, *works[name].cells(seconds, peak))
        console.print(t)
        ours32 = PACKED if packed is not None else "ours, preallocated cache, fp32"
        results[f"{strategy}/fp32_vs_hf"] = times[ours32] / times["HF generate (cache), fp32"]
        results[f"{strategy}/fp32_same_tokens"] = outputs[ours32] == reference
        if onnx is not None:
            results[f"{strategy}/onnx_vs_ours_fp32"] = times[ONNX] / times[ours32]
            results[f"{strategy}/onnx_same_tokens"] = outputs[ONNX] == reference
        weights = sum(p.numel() * p.element_size() for p in module.decoder.parameters())  # a tied lm_head is counted once
        floor = args.tokens * weights / (peak.read_gbs * 1e9)
        console.print(f"  floor: the decoder's {weights / 1e6:.0f} MB of weights read once per step, {args.tokens} steps at {peak.read_gbs:.1f} GB/s = "
                      f"{floor:.3f} s; ours fp32 {times[ours32]:.3f} s is {100 * floor / times[ours32]:.0f} % of that floor's speed "
                      f"(the rest: the image encoder, the prefix, and per-step work)")
    return results


def throughput_table(module, int8, packed, images, eos, args, console, peak) -> None:
    """Batched greedy over all images vs ClipCap's per-image loop (timed on `--loop-images` of them:
    a per-image loop's time is linear in the number of images)."""
    d = Decoding("greedy", max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    few = images[: args.loop_images]
    loop = f"ClipCap-style per-image loop ({len(few)} images timed)"
    methods = {loop: lambda: [clipcap_greedy(module, im[None], eos, args.tokens) for im in few]}
    counts = {loop: len(few)}
    for name, model in (("ours, batched, fp32", module), ("ours, batched, prepacked fp32", packed), ("ours, batched, int8", int8)):
        if model is not None:
            methods[f"{name} ({len(images)} images)"] = lambda model=model: ours(model, images, d)
            counts[f"{name} ({len(images)} images)"] = len(images)
    with console.status(f"throughput: {len(methods)} methods x {args.runs} runs, interleaved"):
        times, _ = interleaved(methods, args.runs, args.device)
        works = {name: roofline.measure(fn) for name, fn in methods.items()}
    t = Table(title=f"greedy throughput, {args.tokens} new tokens, encoder included (median of {args.runs}, interleaved)")
    for column in ("method", "images / s", "x per-image loop", *roofline.COLUMNS):
        t.add_column(column, justify="left" if column == "method" else "right")
    base = counts[loop] / times[loop]
    for name, seconds in times.items():
        rate = counts[name] / seconds
        t.add_row(name, f"{rate:.3f}", f"{rate / base:.1f}", *works[name].cells(seconds, peak))
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
    parser.add_argument("--device", default="cpu", help="cpu or cuda (int8 is CPU-only and left out on cuda)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per method before the timed ones")
    parser.add_argument("--tokens", type=int, default=20, help="new tokens per caption, exactly")
    parser.add_argument("--images", type=int, default=64, help="batch for the greedy throughput")
    parser.add_argument("--loop-images", type=int, default=4, help="images timed through the per-image loop")
    parser.add_argument("--prefix-length", type=int, default=40, help="the paper's prefix (experiment=coco_attn)")
    parser.add_argument("--mapper-layers", type=int, default=8)
    parser.add_argument("--decoder", choices=sorted(DECODERS), default="gpt2-124m", help="the full-size decoder architecture")
    parser.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "data" / "gpt2_tokenizer"), help="GPT-2's vocab.json + merges.txt")
    parser.add_argument("--ckpt", help="a trained checkpoint: report int8 and bf16 vs fp32 caption agreement on its test split")
    parser.add_argument("--skip-speed", action="store_true", help="only the --ckpt agreement")
    parser.add_argument("--only", choices=["latency", "throughput"], help="run one of the two speed tables")
    parser.add_argument("--clipcap", action=argparse.BooleanOptionalAction, default=True,
                        help="the ClipCap-style loop's row in the latency table (--no-clipcap: it recomputes the whole sequence every step, "
                             "by far the slowest row at full size)")
    parser.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True,
                        help="the ONNX Runtime row in the latency table (CPU only; --no-onnx skips the export)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no GPU here: run on a GPU machine or drop --device")
    global WARMUP
    WARMUP = args.warmup
    console = Console(width=150)  # the tables stay whole in logs
    if not args.skip_speed:
        if not (Path(args.tokenizer) / "vocab.json").is_file():
            sys.exit(f"GPT-2's tokenizer files are not in {args.tokenizer}: pass --tokenizer DIR (vocab.json + merges.txt)")
        torch.manual_seed(0)
        module = CaptionModule(
            encoder=VIT_B32, decoder=DECODERS[args.decoder], tokenizer=args.tokenizer, prefix_length=args.prefix_length,
            mapper={"name": "attention", "num_layers": args.mapper_layers},
        ).eval()
        int8 = quantize_module(module) if args.device == "cpu" else None
        onnx = onnx_graphs(module, args.threads) if args.device == "cpu" and args.onnx and args.only != "throughput" else None
        packed = prepack_module(module) if args.device == "cpu" and prepack_available() else None
        module = module.to(args.device)
        eos = module.tokenizer.eos_token_id
        images = torch.randn(args.images, 3, 224, 224, device=args.device)  # (B, 3, H, W) normalised pixels
        peak = roofline.probe(args.device)
        console.print(f"ViT-B/32 + {args.decoder} (random), attention mapper {args.mapper_layers} layers, prefix {args.prefix_length}, "
                      f"{args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
        console.print(peak.line())
        if args.only != "throughput":
            results = latency_table(module, int8, packed, onnx, images[:1], eos, args, console, peak)
            console.print({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()})
            console.print(f"target: ours fp32 beam 5 <= 0.7x HF generate fp32 with the same tokens -> {results['beam/fp32_vs_hf']:.2f}x, "
                          f"same tokens: {results['beam/fp32_same_tokens']}: {'PASS' if results['beam/fp32_vs_hf'] <= 0.7 and results['beam/fp32_same_tokens'] else 'FAIL'}")
        if args.only != "latency":
            throughput_table(module, int8, packed, images, eos, args, console, peak)
    if args.ckpt:
        agreement(args.ckpt, console, batch_size=100)


if __name__ == "__main__":
    main()
