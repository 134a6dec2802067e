"""The LightningModule: labels, frozen parts, learning."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate

from captioner.data.dataset import collate


def build(smoke_cfg, *overrides):
    cfg = smoke_cfg(*overrides)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    module = instantiate(cfg.model)
    return module, datamodule


def pixel_batch(module, captions=("a red circle", "a big blue square on the left")):
    tokenizer = module.tokenizer
    items = [{"image_id": i, "input_ids": tokenizer.encode(c) + [tokenizer.eos_token_id]} for i, c in enumerate(captions)]
    batch = collate(items, tokenizer.pad_token_id)
    batch["pixels"] = torch.randn(len(captions), 3, module.encoder.resolution, module.encoder.resolution)
    return batch


def test_labels_are_minus_100_exactly_on_prefix_and_padding(smoke_cfg, monkeypatch):
    module, _ = build(smoke_cfg)
    batch = pixel_batch(module)
    seen = {}
    forward = module.decoder.forward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return forward(*args, **kwargs)

    monkeypatch.setattr(module.decoder, "forward", spy)
    module(batch)
    labels, P = seen["labels"], module.hparams.prefix_length
    assert labels.shape[1] == P + batch["input_ids"].shape[1]
    assert (labels[:, :P] == -100).all()
    assert torch.equal(labels[:, P:] == -100, batch["attention_mask"] == 0)
    assert torch.equal(labels[:, P:][batch["attention_mask"] == 1], batch["input_ids"][batch["attention_mask"] == 1])
    assert seen["attention_mask"][:, :P].all()


def test_frozen_clip_gets_no_gradient_and_stays_in_eval_mode(smoke_cfg):
    module, _ = build(smoke_cfg)
    module.train()
    assert not module.encoder.training and all(not m.training for m in module.encoder.modules())
    assert module.mapper.training and module.decoder.training
    before = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    loss = module(pixel_batch(module)).loss
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in module.encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.mapper.parameters())
    assert all(torch.equal(before[k], v) for k, v in module.encoder.state_dict().items())


def test_frozen_decoder_is_out_of_the_optimizer_and_in_eval_mode(smoke_cfg):
    module, _ = build(smoke_cfg, "model.freeze_decoder=true")
    module.train()
    assert not module.decoder.training
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert not any(id(p) in trainable for p in module.decoder.parameters())
    assert trainable == {id(p) for p in module.mapper.parameters()}


def test_loss_falls_over_a_few_dozen_steps(smoke_cfg):
    torch.manual_seed(0)
    module, datamodule = build(smoke_cfg)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    module.train()
    losses = []
    for _ in range(40):
        loss = module(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_building_random_clip_and_gpt2_leaves_the_run_random_stream_alone(smoke_cfg):
    # the feature store builds the CLIP only on a cold cache: a seeded build must not shift the
    # stream that shuffles, initialises the mapper and draws noise, or cold and warm runs differ
    from captioner.models.decoder import load_decoder
    from captioner.models.encoder import ClipEncoder

    cfg = smoke_cfg()
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    tokenizer = instantiate(cfg.model).tokenizer
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ClipEncoder({**cfg.pretrain.clip.arch, "image_resolution": 64})  # random builds of the tiny architectures
    load_decoder(dict(cfg.pretrain.lm.arch), tokenizer, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_a_checkpoint_with_the_parts_at_the_top_of_its_state_dict_still_loads(embedded_ckpt, tmp_path):
    """Checkpoints written before the model core held `encoder.` / `mapper.` / `decoder.` at the top of
    the state dict: Lightning's own loader and ours read them into `model.`."""
    from captioner.checkpoint import load_module
    from captioner.module import CaptionModule

    checkpoint = torch.load(embedded_ckpt, weights_only=True)
    assert all(k.startswith("model.") for k in checkpoint["state_dict"])
    checkpoint["state_dict"] = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    current = load_module(embedded_ckpt)
    for loaded in (load_module(old), CaptionModule.load_from_checkpoint(old, weights_only=True)):
        state = loaded.state_dict()
        assert state.keys() == current.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in current.state_dict().items())


def test_decoder_lr_gives_the_decoder_its_own_rate_under_the_same_schedule(smoke_cfg):
    module, _ = build(smoke_cfg, "model.lr=1e-3", "model.decoder_lr=2e-4")
    module._trainer = SimpleNamespace(estimated_stepping_batches=100, callbacks=[], world_size=1)  # all configure_optimizers reads of the Trainer
    optimizers = module.configure_optimizers()
    groups, scheduler = optimizers["optimizer"].param_groups, optimizers["lr_scheduler"]["scheduler"]
    assert [g["lr"] for g in groups] == [0.0, 0.0]  # warmup starts both at zero
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in module.decoder.parameters()}
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in module.mapper.parameters()}
    for _ in range(10):
        optimizers["optimizer"].step()  # no gradients: the weights stay, the schedule moves
        scheduler.step()
    factor = groups[0]["lr"] / 1e-3
    assert 0 < factor <= 1 and groups[1]["lr"] == pytest.approx(2e-4 * factor)

    unset, _ = build(smoke_cfg)
    unset._trainer = SimpleNamespace(estimated_stepping_batches=100, callbacks=[], world_size=1)
    (group,) = unset.configure_optimizers()["optimizer"].param_groups
    assert {id(p) for p in group["params"]} == {id(p) for p in unset.parameters() if p.requires_grad}


def factors(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def sgd() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


@pytest.mark.parametrize("start, pace", [(None, None), (0.0, 0.5), (0.08, 0.9)])
def test_a_run_that_keeps_pace_with_its_steps_follows_the_linear_schedule_step_for_step(start, pace):
    # the share of the time limit used: `start` before the first step, then `pace` over the 100 steps (None: no
    # limit). (0.08, 0.9) ends at 98 %, its start-up ahead of the steps until well after the warm-up
    from transformers import get_linear_schedule_with_warmup

    from captioner.module import BudgetSchedule

    reference = get_linear_schedule_with_warmup(sgd(), 10, 100)
    ours = BudgetSchedule(sgd(), 10, 100, None if pace is None else lambda: start + pace * ours.last_epoch / 100)
    assert factors(ours, 100) == factors(reference, 100)


def test_a_run_the_time_limit_stops_early_still_ends_its_decay_at_zero():
    # the time runs out at step 60 of 100: after the warm-up the decay follows the time, from the time's share
    # at the warm-up's end (1/6), and reaches zero at step 60, never rising
    from captioner.module import BudgetSchedule

    scheduler = BudgetSchedule(sgd(), 10, 100, lambda: min(1.0, scheduler.last_epoch / 60))
    lr = factors(scheduler, 61)
    assert lr[:10] == [step / 10 for step in range(10)]  # warm-up by steps
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert lr[30] == pytest.approx(1 - (0.5 - 1 / 6) / (5 / 6)) and lr[60] == 0.0  # by steps: 70/90


def test_a_resumed_schedule_keeps_the_time_share_its_warm_up_ended_at(tmp_path):
    from captioner.module import BudgetSchedule

    clock = {"used": 0.0}
    first = BudgetSchedule(sgd(), 10, 100, lambda: clock["used"])
    for step in range(20):
        clock["used"] = 0.2 + step / 50  # a slow run: the time leads
        first.optimizer.step()
        first.step()
    torch.save(first.state_dict(), tmp_path / "scheduler.pt")  # as a checkpoint holds it: read back weights_only
    resumed = BudgetSchedule(sgd(), 10, 100, lambda: clock["used"])
    resumed.load_state_dict(torch.load(tmp_path / "scheduler.pt", weights_only=True))
    assert resumed.time_at_warmup == first.time_at_warmup == pytest.approx(0.2 + 9 / 50)
    assert factors(resumed, 5) == factors(first, 5)
