"""A Llama-architecture decoder of SmolLM2-135M's size on the real path (slow: `make test-slow`).

SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads, 3 key-value heads, SwiGLU 1536, 49,152 tokens,
tied embeddings, rotary theta 100,000) with random weights, saved as a user has a downloaded SmolLM2:
one `save_pretrained` directory holding the model and a `tokenizer.json` tokenizer (byte-level BPE
trained on coco_mini's captions, wrapped by `PreTrainedTokenizerFast`; no vocab.json / merges.txt).
With ViT-B/32 (random, OpenAI's fp16 `.pt`) it runs experiment=coco_attn on coco_mini through the
entry points: extract -> train (3 steps of 8 captions) -> export -> `captioner.caption`. Each stage's wall time
and peak RSS are printed as a table (docs/results/decoders.md quotes them).

    HF_HUB_OFFLINE=1 python -m pytest -m slow tests/test_full_size_llama.py -s
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from rich.table import Table

from conftest import SHARED_DATA
from test_experiments import coco_mini_overrides
from test_real_path import Stages, run_stage

pytestmark = pytest.mark.slow
COCO_MINI = SHARED_DATA / "coco_mini"
SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192, "rope_theta": 100000.0,
                "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
EOS = "<|endoftext|>"  # SmolLM2's beginning and end of text (id 0)


def caption_tokenizer(folder: Path):
    """A byte-level BPE of coco_mini's captions in `tokenizer.json` form, SmolLM2's special tokens first."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    captions = [a["caption"] for split in ("captions_train2017_subset80.json", "captions_val2017_subset159.json")
                for a in json.loads((COCO_MINI / "annotations" / split).read_text())["annotations"]]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(captions, vocab_size=4096, min_frequency=2, special_tokens=[EOS, "<|im_start|>", "<|im_end|>"],
                            show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture(scope="module")
def smollm2_shaped(tmp_path_factory) -> tuple[Path, Path]:
    """(ViT-B-32.pt, a SmolLM2-135M-shaped save_pretrained directory with its tokenizer.json)."""
    from clip.model import CLIP
    from transformers import LlamaConfig, LlamaForCausalLM

    from captioner.models.zoo import CLIP_ARCHS, resolve

    if not COCO_MINI.is_dir():
        pytest.skip("../shared/data/coco_mini is not present")
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    clip_model = CLIP(**resolve({"arch": "ViT-B/32"}, CLIP_ARCHS, "model.encoder"))
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in clip_model.state_dict().items()}, folder / "ViT-B-32.pt")
    decoder = folder / "smollm2-135m"
    tokenizer = caption_tokenizer(decoder)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M, bos_token_id=eos, eos_token_id=eos))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M's count
    model.save_pretrained(decoder)
    assert (decoder / "tokenizer.json").is_file() and not (decoder / "vocab.json").exists()
    return folder / "ViT-B-32.pt", decoder


def test_a_smollm2_sized_llama_decoder_trains_exports_and_captions(smollm2_shaped, tmp_path):
    clip_pt, decoder = smollm2_shaped
    stages = Stages("coco_attn, SmolLM2-135M-shaped decoder")
    common = ["experiment=coco_attn", *coco_mini_overrides(COCO_MINI, tmp_path / "features", clip_pt, decoder, decoder),
              "trainer=cpu", "data.eval_batch_size=16"]
    run_stage(stages, "extract", "captioner.extract", *common, f"hydra.run.dir={tmp_path / 'extract'}")
    train_dir = tmp_path / "train"
    done = run_stage(stages, "train (3 steps, batch 8)", "captioner.train", *common, "trainer.max_steps=3", "trainer.limit_val_batches=1",
                     "model.val_cider_images=4", "model.val_decoding.max_new_tokens=5", "data.batch_size=8", "score=false", "score_meteor=false",
                     f"hydra.run.dir={train_dir}")
    assert "trainable parameters (finetune decoder)" in done.stdout + done.stderr
    ckpt = train_dir / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 3

    export_dir = tmp_path / "export"
    run_stage(stages, "export", "captioner.export", f"ckpt={ckpt}", f"out={export_dir}")
    assert (export_dir / "tokenizer" / "tokenizer.json").is_file()  # the whole tokenizer travels

    photos = sorted((COCO_MINI / "images" / "val2017").glob("*.jpg"))[:4]
    run_stage(stages, "caption (4 photos)", "captioner.caption", "--ckpt", str(export_dir), *map(str, photos),
              "-o", str(tmp_path / "captions.jsonl"), "--max-new-tokens", "8")
    rows = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert [Path(r["file"]).name for r in rows] == [p.name for p in photos]
    assert all(isinstance(r["caption"], str) and EOS not in r["caption"] for r in rows)

    table = Table("stage", "wall s", "peak RSS MiB", title=f"{stages.experiment} on coco_mini (CPU)")
    for name, seconds, rss in stages.rows:
        table.add_row(name, f"{seconds:.0f}", f"{rss:.0f}")
    table.add_row("total", f"{sum(s for _, s, _ in stages.rows):.0f}", f"{max(r for _, _, r in stages.rows):.0f}")
    Console(width=120).print(table)
