"""Training mechanics (trainer/engine.py, warm_up included), in process on tiny tensors.

The lr schedule (warm-up, decay, final ratio), the optimizer's parameter groups (the BatchNorm-shift lr
multiplier, the whitening bias frozen after its epochs), lookahead and EMA weight averaging (and that the
exporter takes the EMA weights), and the warm-up that must leave model and optimizer exactly as it found them.
Expected values are worked out here from the documented formulas. A fast_resnet at widths 8/16/16 on random
32x32 batches stands in for the default model; no data set is needed. Run: `pytest tests/test_engine.py`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from trainer_helpers import assert_bitwise_equal

import trainer.engine as engine
from trainer.checkpoint import TrainingCheckpoint, save_checkpoint
from trainer.config import RECIPES, TrainConfig
from trainer.distributed import Runtime
from trainer.engine import (
    Lookahead,
    Loop,
    build_train_state,
    lr_factor,
    make_optimizer,
    set_lr,
    train_one_epoch,
    train_step,
)
from trainer.export import load_trained_model
from trainer.models import FastResNet, build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
CLASSES = [f"class{i}" for i in range(10)]


def _config(**changes) -> TrainConfig:
    """The default model's recipe (Nesterov SGD, BN shifts at 64x lr, lookahead, ...) on the CPU in fp32."""
    return TrainConfig(**{**RECIPES["fast_resnet"], "device": "cpu", "precision": "fp32", **changes})


def _tiny_fast_resnet(seed: int = 0) -> FastResNet:
    torch.manual_seed(seed)
    model = FastResNet(10, widths=(8, 16, 16))
    model.init_from_data(torch.randn(64, 3, 32, 32))
    return model


def _batches(count: int, seed: int, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 3, 32, 32, generator=generator), torch.randint(0, 10, (size,), generator=generator))
        for _ in range(count)
    ]


def _step(state, batch) -> None:
    train_step(
        state.model, state.optimizer, *batch, device=CPU.device, precision="fp32", label_smoothing=0.2, scaler=None
    )


def _loop(state, config: TrainConfig, total_steps: int = 1, num_epochs: int = 1) -> Loop:
    return Loop(config, CPU, "fp32", state.model, total_steps, num_epochs)


def _epoch(state, config: TrainConfig, batches, total_steps: int, num_epochs: int) -> None:
    train_one_epoch(state, _loop(state, config, total_steps, num_epochs), iter(batches), len(batches))


def _parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _changed(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}


# ------------------------------------------------------------------ lr schedule


SCHEDULE = dict(warmup=0.2, start_lr_ratio=0.1, final_lr_ratio=0.05)  # 100 steps: 20 of warm-up, 80 of decay


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [
        ("linear", 0, 0.1),  # warm-up starts at start_lr_ratio
        ("linear", 10, 0.1 + 0.9 * 10 / 20),  # ... rises linearly ...
        ("linear", 20, 1.0),  # ... to the peak at the end of warm-up
        ("linear", 40, 1 - 0.95 * 20 / 80),  # then falls linearly ...
        ("linear", 60, 1 - 0.95 * 40 / 80),
        ("linear", 100, 0.05),  # ... to final_lr_ratio at the last step
        ("cosine", 0, 0.1),
        ("cosine", 10, 0.55),
        ("cosine", 20, 1.0),
        ("cosine", 40, 1 - 0.95 * (1 - math.cos(math.pi * 20 / 80)) / 2),  # half a cosine period over the decay
        ("cosine", 60, 1 - 0.95 * 0.5),
        ("cosine", 100, 0.05),
    ],
)
def test_lr_factor_warms_up_then_decays_to_the_final_ratio(schedule: str, step: int, expected: float) -> None:
    config = _config(schedule=schedule, **SCHEDULE)
    assert lr_factor(step, 100, config) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lr_factor_rises_during_warm_up_and_never_rises_after(schedule: str) -> None:
    config = _config(schedule=schedule, **SCHEDULE)
    factors = [lr_factor(step, 100, config) for step in range(101)]
    assert all(a < b for a, b in itertools.pairwise(factors[:21]))
    assert all(a >= b for a, b in itertools.pairwise(factors[20:]))


def test_lr_factor_without_warm_up_starts_at_the_peak() -> None:
    config = _config(warmup=0.0, start_lr_ratio=0.1, final_lr_ratio=0.0, schedule="linear")
    assert [lr_factor(step, 10, config) for step in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])


# ------------------------------------------------------------------ optimizer groups: BN shifts, whitening bias


def test_make_optimizer_puts_each_trainable_parameter_in_one_group() -> None:
    model = _tiny_fast_resnet()
    optimizer = make_optimizer(model, _config())
    names = {id(p): name for name, p in model.named_parameters()}
    groups = {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups}
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert (
        sorted(name for names in groups.values() for name in names) == trainable
    )  # each trainable parameter once; frozen ones nowhere
    assert groups["whiten_bias"] == ["whiten.bias"]
    norm_shifts = sorted(n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))
    assert groups["norm_bias"] == sorted(f"{n}.bias" for n in norm_shifts)  # BN scales are frozen at 1
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.85


def test_make_optimizer_bn_shifts_get_the_lr_multiplier_with_the_same_decay_per_step() -> None:
    config = _config(lr=0.75, weight_decay=1.33e-3, bias_lr_scale=64.0)
    groups = {g["name"]: g for g in make_optimizer(_tiny_fast_resnet(), config).param_groups}
    assert groups["norm_bias"]["lr"] == pytest.approx(0.75 * 64) and groups["other"]["lr"] == 0.75
    assert groups["norm_bias"]["base_lr"] == pytest.approx(0.75 * 64) and groups["other"]["base_lr"] == 0.75
    # lr x weight decay, the shrink per step, is the same for every group
    for group in groups.values():
        assert group["lr"] * group["weight_decay"] == pytest.approx(0.75 * 1.33e-3)


def test_set_lr_scales_every_group_and_a_bn_shift_moves_64x_further() -> None:
    """One real SGD step with the same gradient everywhere: a BN shift moves bias_lr_scale times as far."""
    config = _config(lr=0.5, weight_decay=0.0, bias_lr_scale=64.0, momentum=0.0)
    model = _tiny_fast_resnet()
    optimizer = make_optimizer(model, config)
    assert set_lr(optimizer, 0.1, freeze_whiten_bias=False) == pytest.approx(0.05)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(
        {"norm_bias": 0.5 * 64 * 0.1, "whiten_bias": 0.05, "other": 0.05}
    )
    before = _parameters(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    optimizer.step()
    moved = {name: (p - before[name]).abs().max().item() for name, p in model.named_parameters()}
    assert moved["blocks.0.norm1.bias"] == pytest.approx(64 * 0.05, rel=1e-6)
    assert moved["blocks.0.conv1.weight"] == pytest.approx(0.05, rel=1e-6)
    assert moved["whiten.bias"] == pytest.approx(0.05, rel=1e-6)


def test_train_one_epoch_freezes_the_whitening_bias_after_its_epochs() -> None:
    config = _config(whiten_bias_epochs=1.0, averaging="none")
    state = build_train_state(_tiny_fast_resnet(), config)
    changed = []
    for epoch in range(3):
        before = _parameters(state.model)
        _epoch(state, config, _batches(2, seed=epoch), total_steps=6, num_epochs=3)
        changed.append(_changed(before, state.model))
    assert "whiten.bias" in changed[0], "the whitening bias trains during its epochs"
    for later in changed[1:]:
        assert "whiten.bias" not in later, "the whitening bias must stay frozen after --whiten-bias-epochs"
        assert {"head.weight", "blocks.0.norm1.bias", "blocks.2.conv2.weight"} <= later, "the rest still trains"
    assert "whiten.weight" not in set().union(*changed), "the whitening filters are never trained"


# ------------------------------------------------------------------ weight averaging


def test_lookahead_blends_towards_the_slow_weights_with_a_cubic_ramp() -> None:
    model = nn.Linear(3, 2)
    lookahead = Lookahead(model)
    slow = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    fast = {k: v.clone() for k, v in model.state_dict().items()}
    lookahead.update(model, step=50, total_steps=100)
    decay = 0.95**5 * 0.5**3  # 0.95 per step over the 5 steps since the last update, x (t / T)^3
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, decay * slow[key] + (1 - decay) * fast[key])
        torch.testing.assert_close(lookahead.state_dict()[key], value)  # training continues from the blend
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    blended = {k: v.clone() for k, v in lookahead.state_dict().items()}
    lookahead.update(model, step=100, total_steps=100)  # the last step: the weights become the slow copy
    for key, value in model.state_dict().items():
        assert torch.equal(value, blended[key])


def _set_weights(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for tensor in [*model.parameters(), model[1].running_mean, model[1].running_var]:
            tensor.fill_(value)


def test_train_state_ema_averages_weights_and_bn_statistics_exponentially() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    state = build_train_state(model, _config(averaging="ema", ema_decay=0.9))
    assert state.eval_model is state.ema.module and state.lookahead is None
    expected = None
    for t in range(1, 5):
        _set_weights(model, float(t))
        state.ema.update_parameters(model)
        expected = float(t) if expected is None else 0.9 * expected + 0.1 * t  # the first update copies
        for tensor in [*state.ema.module.parameters(), state.ema.module[1].running_mean]:
            torch.testing.assert_close(tensor, torch.full_like(tensor, expected))
    assert int(state.ema.n_averaged) == 4


def test_train_state_round_trip_restores_ema_and_its_count() -> None:
    """A resumed run's next EMA update must average (not copy), so the count is part of the state."""
    config = _config(averaging="ema", ema_decay=0.9)
    state = build_train_state(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), config)
    for t in (1.0, 5.0):
        _set_weights(state.model, t)
        state.ema.update_parameters(state.model)
    restored = build_train_state(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), config)
    restored.load_state_dict(copy.deepcopy(state.state_dict()))
    assert_bitwise_equal(restored.state_dict(), state.state_dict(), "restored training state")
    for s in (state, restored):
        _set_weights(s.model, 10.0)
        s.ema.update_parameters(s.model)
    assert_bitwise_equal(restored.ema.module.state_dict(), state.ema.module.state_dict(), "EMA after one more update")
    torch.testing.assert_close(state.ema.module[0].bias, torch.full((4,), 0.9 * (0.9 * 1 + 0.1 * 5) + 0.1 * 10))


def test_train_one_epoch_updates_the_ema_every_step() -> None:
    config = _config(averaging="ema", ema_decay=0.5)
    state = build_train_state(_tiny_fast_resnet(), config)
    _epoch(state, config, _batches(3, seed=0), total_steps=3, num_epochs=1)
    assert int(state.ema.n_averaged) == 3 and state.step == 3
    ema, model = state.ema.module.state_dict(), state.model.state_dict()
    assert not torch.equal(ema["head.weight"], model["head.weight"]), "the EMA copy lags the trained weights"


def test_export_takes_the_ema_weights_of_a_checkpoint(tmp_path: Path) -> None:
    trained, averaged = build_model("baseline_cnn"), build_model("baseline_cnn")
    checkpoint = TrainingCheckpoint(
        model_name="baseline_cnn",
        class_names=CLASSES,
        normalization={"mean": [0.5] * 3, "std": [0.25] * 3},
        model=trained.state_dict(),
        ema=averaged.state_dict(),
        ema_n_averaged=7,
        lookahead=None,
        optimizer={},
        step=7,
        epoch=1,
        total_steps=7,
        finished=True,
        rng={},
        config=dataclasses.asdict(_config()),
        commands=[],
        timer={},
    )
    save_checkpoint(checkpoint, tmp_path / "run" / "checkpoint.pt")
    save_checkpoint(checkpoint.model_checkpoint(), tmp_path / "model.pt")  # what fit writes as model.pt
    for source in (tmp_path / "run", tmp_path / "model.pt"):
        exported, _, _ = load_trained_model(source)
        assert_bitwise_equal(exported.model.state_dict(), averaged.state_dict(), f"weights exported from {source.name}")
        assert not torch.equal(exported.model.fc3.weight, trained.fc3.weight)


# ------------------------------------------------------------------ warm-up: run, then undo


def _warm_up(state, config: TrainConfig, batch) -> None:
    engine.warm_up(state, _loop(state, config), batch)


@pytest.mark.parametrize("trained_before", [0, 2], ids=["fresh-optimizer", "with-momentum"])
def test_warm_up_leaves_model_and_optimizer_bitwise_unchanged(
    trained_before: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config()
    state = build_train_state(_tiny_fast_resnet(), config)
    for batch in _batches(trained_before, seed=1):
        _step(state, batch)
    set_lr(state.optimizer, 0.5, freeze_whiten_bias=False)
    model_before = copy.deepcopy(state.model.state_dict())  # weights and BN statistics
    optimizer_before = copy.deepcopy(state.optimizer.state_dict())

    steps_seen = []
    real_step = engine.train_step

    def counting_step(*args, **kwargs):
        steps_seen.append(_parameters(state.model))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", counting_step)
    _warm_up(state, config, _batches(1, seed=2)[0])
    assert len(steps_seen) == engine.WARMUP_STEPS >= 2
    trained = {k for k in steps_seen[0] if not torch.equal(steps_seen[-1][k], steps_seen[0][k])}
    assert "head.weight" in trained, "the warm-up steps must really train (else this test proves nothing)"
    assert_bitwise_equal(state.model.state_dict(), model_before, "model after warm-up")
    optimizer_after = state.optimizer.state_dict()
    assert optimizer_after["param_groups"] == optimizer_before["param_groups"]  # lrs, momentum, ...
    assert optimizer_after["state"].keys() == optimizer_before["state"].keys(), "momentum buffers appeared or vanished"
    if trained_before:
        assert_bitwise_equal(optimizer_after["state"], optimizer_before["state"], "momentum buffers after warm-up")


def test_warm_up_then_training_matches_training_without_warm_up() -> None:
    config = _config()
    warmed, plain = (build_train_state(_tiny_fast_resnet(), config) for _ in range(2))
    _warm_up(warmed, config, _batches(1, seed=3)[0])
    for state in (warmed, plain):
        _epoch(state, config, _batches(3, seed=4), total_steps=3, num_epochs=1)
    assert_bitwise_equal(warmed.state_dict(), plain.state_dict(), "training state after warm-up and 3 steps")
