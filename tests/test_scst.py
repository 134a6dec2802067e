"""Self-critical training: the policy gradient's parts, and a second stage from a cross-entropy checkpoint."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from captioner.checkpoint import load_module
from captioner.generate import Decoding, generate_ids
from captioner.train import run
from conftest import compose_train


@pytest.fixture
def scst_cfg(tmp_path, data_dir, embedded_ckpt):
    def make(*overrides: str):
        # the cross-entropy run's model settings: embedded_ckpt trained the attention mapper
        return compose_train(tmp_path / "scst", data_dir,
                             ["experiment=[smoke,scst]", f"init_from={embedded_ckpt}", "model/mapper=attention", *overrides])

    return make


def test_needs_a_checkpoint_and_a_known_baseline(tmp_path, data_dir):
    cfg = compose_train(tmp_path / "run", data_dir, ["experiment=[smoke,scst]"])
    with pytest.raises(InstantiationException, match="pass init_from="):
        instantiate(cfg.model)
    cfg = compose_train(tmp_path / "run", data_dir, ["experiment=[smoke,scst]", "init_from=x.ckpt", "model.baseline=best"])
    with pytest.raises(InstantiationException, match="baseline 'best' is not one of"):
        instantiate(cfg.model)


def test_starts_from_the_checkpoint_and_scores_the_same_tokens_the_sampler_chose(scst_cfg, embedded_ckpt):
    cfg = scst_cfg()
    module = instantiate(cfg.model)
    ce = load_module(embedded_ckpt)
    for name, tensor in ce.state_dict().items():
        assert torch.equal(tensor, module.state_dict()[name]), name
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    prefix = module.prefix(batch)[:6]
    greedy = generate_ids(module.decoder, module.tokenizer, prefix.detach(), Decoding(max_new_tokens=12))
    eos = module.tokenizer.eos_token_id
    actions = [g + [eos] if len(g) < 12 else g for g in greedy]
    logp, mask = module.model.token_log_probs(prefix, actions)
    # the teacher-forced pass sees the distributions the decoder sampled from: every greedy token is its argmax
    embeds = torch.cat([prefix, module.decoder.get_input_embeddings()(torch.tensor([a + [eos] * (logp.shape[1] - len(a)) for a in actions]))], 1)
    best = torch.log_softmax(module.decoder(inputs_embeds=embeds).logits[:, prefix.shape[1] - 1 : -1].float(), -1).amax(-1)
    assert mask.sum() == sum(len(a) for a in actions)
    torch.testing.assert_close(logp[mask.bool()], best[mask.bool()], atol=1e-5, rtol=0)
    logp.sum().backward()
    assert module.mapper.parameters().__next__().grad is not None and all(p.grad is None for p in module.encoder.parameters())


@pytest.mark.parametrize("baseline", ["greedy", "mean"])
def test_a_training_step_is_a_finite_loss_from_rewards_and_baselines(scst_cfg, baseline):
    cfg = scst_cfg(f"model.baseline={baseline}")
    module = instantiate(cfg.model)
    assert not any(m.training for m in module.modules())  # no dropout in any sample (Lightning never calls train())
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    from captioner.reward import CiderD

    module.cider = CiderD.cached(datamodule.references("train"), datamodule.hparams.cache_dir)
    batch = next(iter(datamodule.train_dataloader()))
    torch.manual_seed(0)
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss) and loss.requires_grad
    assert logged["train/reward"] > 0 and logged["train/sample_length"] > 1
    if baseline == "mean":
        assert logged["train/baseline"] == pytest.approx(logged["train/reward"], abs=1e-5)  # leave-one-out means average to the mean


@pytest.mark.slow  # a whole (smoke-sized) second stage with end-of-training scoring
@pytest.mark.java
def test_second_stage_run_writes_scores_and_a_plain_checkpoint(scst_cfg):
    cfg = scst_cfg()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = run(cfg)
    assert not [str(w.message) for w in caught if "in eval mode" in str(w.message)]  # all of it, on purpose: no dropout
    out = Path(cfg.paths.output_dir)
    scores = json.loads((out / "scores.json").read_text())
    assert "CIDEr" in scores["model"] and "clipscore" in scores
    assert "train/reward" in metrics
    assert list(out.parent.parent.glob("**/cider-d-*.json")) or list(Path(cfg.data.cache_dir).glob("cider-d-*.json"))
    module = load_module(out / "checkpoints" / "last.ckpt")  # an SCST model is a plain CaptionModule
    assert type(module).__name__ == "CaptionModule"
