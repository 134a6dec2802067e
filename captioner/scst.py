"""Self-critical sequence training (Rennie et al. 2017): a second stage after cross-entropy.

    python -m captioner.train experiment=scst init_from=outputs/train/runs/<run>/checkpoints/<best>.ckpt

For each training image the policy (mapper + GPT-2) samples K captions with `captioner/generate.py`'s
sampler (temperature 1, no filtering: the model's own distribution), each is rewarded with CIDEr-D
against the image's references (`captioner/reward.py`: document frequencies of all training
references, prepared once and cached), and the loss is the REINFORCE estimate with a baseline b:

    loss = - sum_i (r_i - b_i) * sum_t log p(w_i,t | image, w_i,<t) / (number of sampled tokens)

b is the greedy caption's reward (`baseline: greedy`, SCST proper) or the mean reward of the image's
other K-1 samples (`baseline: mean`, as in Luo 2020's "new self-critical baseline"). The log-probs come
from one teacher-forced pass of the same GPT-2 over prefix + sampled tokens, end-of-text included
when the sample ended by itself. Dropout stays off, so the sampler and the gradient see one model.

The checkpoints hold a plain CaptionModule's hyperparameters: an SCST model loads, captions, exports
and serves like any other. The SCST settings are in the run's config.yaml.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from captioner.checkpoint import read_checkpoint
from captioner.generate import Decoding, generate_ids
from captioner.module import CaptionModule
from captioner.reward import CiderD, tokenize_fast

BASELINES = ("greedy", "mean")


class SCSTModule(CaptionModule):
    def __init__(
        self,
        init_from: str | None = None,  # the cross-entropy checkpoint the policy starts from (required)
        num_samples: int = 5,  # K captions sampled per image
        baseline: str = "greedy",  # greedy: reward of the greedy caption | mean: mean of the other K-1 samples
        max_new_tokens: int = 30,  # sampled caption length limit
        reward_cache: str | None = None,  # where the references' tokens + document frequencies are cached; None: the data's cache_dir
        **caption_module,  # CaptionModule's arguments: the same model as the checkpoint's
    ):
        if not init_from:
            raise ValueError("SCST starts from a cross-entropy checkpoint: pass init_from=outputs/train/runs/<run>/checkpoints/<file>.ckpt")
        if baseline not in BASELINES:
            raise ValueError(f"scst baseline {baseline!r} is not one of {BASELINES} (model.baseline)")
        if num_samples < 1 or (baseline == "mean" and num_samples < 2):
            raise ValueError(f"scst needs num_samples >= 1 (>= 2 with the mean baseline), got {num_samples} (model.num_samples)")
        super().__init__(**caption_module)
        path = Path(init_from).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"init_from={init_from} does not exist: pass a .ckpt from a cross-entropy run's checkpoints/")
        state = read_checkpoint(path)["state_dict"]
        own = self.state_dict()
        resized = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if resized:
            k = resized[0]
            raise ValueError(
                f"init_from={init_from} has other sizes than this model ({k}: {tuple(state[k].shape)} there, "
                f"{tuple(own[k].shape)} here; {len(resized)} tensors differ): pass the same model/* and pretrain.* "
                "overrides as the cross-entropy run"
            )
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"init_from={init_from} is not this model (missing {missing[:3]}, unexpected {unexpected[:3]}): "
                "pass the same model/* overrides as the cross-entropy run"
            )
        self.num_samples, self.baseline, self.reward_cache = num_samples, baseline, reward_cache
        self.sampling = Decoding(strategy="sample", temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens)  # the model's own distribution
        self.greedy = Decoding(strategy="greedy", max_new_tokens=max_new_tokens)
        self.cider: CiderD | None = None
        self.train(False)  # Lightning never calls train(): it keeps, and restores after validation, each module's mode

    def eval_while_training(self) -> list[nn.Module]:
        return [self]  # all of it: no dropout while sampling and scoring

    def train(self, mode: bool = True) -> "SCSTModule":
        return super().train(False)  # no dropout: the sampled captions and their log-probs come from one model

    def on_fit_start(self) -> None:
        super().on_fit_start()
        datamodule = self.trainer.datamodule
        datamodule.setup("fit")
        cache = self.reward_cache or datamodule.hparams.cache_dir
        self.cider = CiderD.cached(datamodule.references("train"), cache)

    def rewards(self, image_ids: list[int], ids: list[list[int]]) -> torch.Tensor:
        captions = [tokenize_fast(self.tokenizer.decode(row, skip_special_tokens=True)) for row in ids]
        return torch.from_numpy(self.cider.score(image_ids, captions)).float()

    def training_step(self, batch, batch_idx):
        # caption-level batches repeat an image now and then: each image once
        ids = batch["image_id"].tolist()
        first = sorted({image_id: i for i, image_id in reversed(list(enumerate(ids)))}.values())
        images = {key: batch[key][first] for key in ("clip_features", "patch_tokens") if key in batch}
        image_ids = [ids[i] for i in first]
        k, eos = self.num_samples, self.tokenizer.eos_token_id

        prefix = self.prefix(images)  # (B, P, D), with gradient: the mapper is trained too
        repeated = prefix.repeat_interleave(k, dim=0)  # (B*K, P, D): sample i of image b is row b*K + i
        samples = generate_ids(self.decoder, self.tokenizer, repeated.detach().to(self.decoder.dtype), self.sampling)
        sample_ids = [i for i in image_ids for _ in range(k)]
        reward = self.rewards(sample_ids, samples).to(prefix.device).view(-1, k)  # (B, K)
        if self.baseline == "greedy":
            greedy = generate_ids(self.decoder, self.tokenizer, prefix.detach().to(self.decoder.dtype), self.greedy)
            base = self.rewards(image_ids, greedy).to(prefix.device)[:, None]  # (B, 1)
        else:
            base = (reward.sum(dim=1, keepdim=True) - reward) / (k - 1)  # (B, K): the other samples' mean
        advantage = (reward - base).view(-1)  # (B*K,)

        # a caption that stopped by itself chose end-of-text: that choice is rewarded too
        actions = [s + [eos] if len(s) < self.sampling.max_new_tokens else s for s in samples]
        logp, mask = self.model.token_log_probs(repeated, actions)
        loss = -(advantage[:, None] * logp).sum() / mask.sum().clamp(min=1)

        n = len(image_ids)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/reward", reward.mean(), prog_bar=True, batch_size=n)
        self.log("train/baseline", base.mean(), batch_size=n)
        self.log("train/sample_length", mask.sum(dim=1).float().mean(), batch_size=n)
        return loss

