"""Model zoo (trainer/models.py): the registry, output shapes, init schemes, the whitening stem, exportability.

Fast unit tests on random inputs; no data set needed. Run: `pytest tests/test_models.py`.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from trainer.models import (
    DEFAULT_MODEL,
    INIT_SCHEMES,
    MODEL_NAMES,
    MODELS,
    FastResNet,
    apply_init,
    build_model,
    count_parameters,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _summary_parameters(summary: str) -> float | None:
    """The parameter count a registry summary states ('~2.0M params', '62K params'), if any."""
    match = re.search(r"([\d.]+)([MK]) params", summary)
    return float(match[1]) * {"M": 1e6, "K": 1e3}[match[2]] if match else None


MODELS_WITH_COUNTS = [name for name, spec in MODELS.items() if _summary_parameters(spec.summary)]


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def test_registry_lists_every_model_with_a_summary() -> None:
    assert tuple(MODELS) == MODEL_NAMES
    assert DEFAULT_MODEL in MODELS
    assert len(set(MODEL_NAMES)) == len(MODEL_NAMES) >= 10
    for name, spec in MODELS.items():
        assert spec.summary.strip(), f"{name} has no summary"


@pytest.mark.parametrize("name", MODELS_WITH_COUNTS)
def test_build_model_parameter_count_matches_summary(name: str) -> None:
    stated = _summary_parameters(MODELS[name].summary)
    count = count_parameters(build_model(name))
    assert count == pytest.approx(stated, rel=0.05), f"{name}: {count:,} parameters, summary says {stated:,.0f}"


def test_build_model_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet1000'") as info:
        build_model("resnet1000")
    for name in MODEL_NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("batch_size", [1, 7])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_build_model_gives_logits_per_image(name: str, batch_size: int) -> None:
    model = build_model(name).eval()
    with torch.no_grad():
        logits = model(torch.randn(batch_size, 3, 32, 32))
    assert logits.shape == (batch_size, 10)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["fast_resnet", "resnet20", "resnet18", "resnet9", "baseline_cnn"])
def test_build_model_num_classes_sets_the_head(name: str) -> None:
    model = build_model(name, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_build_model_trains_in_train_mode_with_batch_one_image() -> None:
    # Spatial maps are > 1x1 before every BatchNorm, so even a single image has statistics.
    model = build_model("resnet20").train()
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------ apply_init


def _trainable_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.requires_grad]


def test_apply_init_default_keeps_the_weights() -> None:
    model = build_model("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_init(model, "default")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_apply_init_kaiming_uses_fan_out_std_and_zero_biases() -> None:
    model = build_model("resnet18")
    apply_init(model, "kaiming")
    conv = model.layers[6].conv1  # 256 -> 512 (fan-out is twice fan-in): 1.2M samples, a tight estimate
    assert conv.out_channels == 2 * conv.in_channels
    expected_std = math.sqrt(2 / (conv.out_channels * 9))
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.02)
    assert conv.weight.mean().abs().item() < 0.01 * expected_std
    assert torch.count_nonzero(model.fc.bias) == 0


def test_apply_init_xavier_stays_within_the_uniform_bound() -> None:
    model = build_model("resnet18")
    apply_init(model, "xavier")
    conv = model.layers[6].conv1
    fan = conv.in_channels * 9 + conv.out_channels * 9
    bound = math.sqrt(6 / fan)
    assert conv.weight.abs().max().item() <= bound
    assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)  # std of U(-b, b)
    assert torch.count_nonzero(model.fc.bias) == 0


@pytest.mark.parametrize("scheme", ["kaiming", "xavier"])
def test_apply_init_changes_trainable_weights_but_not_frozen_ones(scheme: str) -> None:
    model = build_model("fast_resnet")
    frozen = model.whiten.weight.clone()
    trainable = [w.clone() for w in _trainable_weights(model)]
    apply_init(model, scheme)
    assert torch.equal(model.whiten.weight, frozen), "the frozen whitening stem was re-initialised"
    changed = [not torch.equal(a, b) for a, b in zip(trainable, _trainable_weights(model), strict=True)]
    assert all(changed)


def test_apply_init_unknown_scheme_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown init 'orthogonal'") as info:
        apply_init(build_model("baseline_cnn"), "orthogonal")
    for scheme in INIT_SCHEMES:
        assert scheme in str(info.value)


# ------------------------------------------------------------------ FastResNet whitening stem


def _correlated_images(n: int = 256) -> torch.Tensor:
    """Images whose 2x2 patches are strongly correlated across channels and neighbouring pixels,
    with very different variances per direction (an anisotropic covariance)."""
    z = torch.randn(n, 3, 33, 33)
    z[:, 0] *= 5
    z[:, 1] += 0.9 * z[:, 0]
    z[:, 2] = 0.3 * z[:, 2] - 0.5 * z[:, 1]
    z = z[..., :-1, :-1] + 0.7 * z[..., 1:, :-1] + 0.2 * z[..., :-1, 1:]  # vertical >> horizontal correlation
    return z


def _channel_covariance(features: torch.Tensor) -> torch.Tensor:
    flat = features.transpose(0, 1).reshape(features.shape[1], -1).double()
    flat = flat - flat.mean(1, keepdim=True)
    return flat @ flat.T / flat.shape[1]


def test_fast_resnet_init_from_data_whitens_2x2_patches() -> None:
    images = _correlated_images()
    model = FastResNet()
    model.init_from_data(images)
    with torch.no_grad():
        out = model.whiten(images)
    covariance = _channel_covariance(out[:, :12])
    off_diagonal = covariance - torch.diag(covariance.diag())
    # eps (5e-4) shrinks each variance to lambda / (lambda + eps): just under 1 for these eigenvalues.
    assert off_diagonal.abs().max().item() < 1e-3, covariance
    assert covariance.diag().min().item() > 0.95, covariance.diag()
    assert covariance.diag().max().item() < 1 + 1e-4, covariance.diag()
    assert _channel_covariance(images).max() > 10, "the input itself must be far from white"


def test_fast_resnet_init_from_data_stacks_filters_and_their_negation() -> None:
    model = FastResNet()
    model.init_from_data(_correlated_images(64))
    weight = model.whiten.weight
    assert weight.shape == (24, 3, 2, 2)
    assert torch.equal(weight[12:], -weight[:12])
    assert torch.count_nonzero(model.whiten.bias) == 0
    assert not weight.requires_grad, "the whitening filters must stay frozen"


@torch.no_grad()
def test_fast_resnet_deep_groups_follow_airbench96() -> None:
    """Each group: conv1 -> pool -> BN -> GELU gives x0, then conv2 -> BN -> GELU -> conv3 -> BN, added to x0,
    then GELU (airbench96's ConvGroup), computed here by hand from the group's own layers."""
    model = build_model("fast_resnet_deep").eval()
    for group in model.blocks:  # non-trivial BN statistics, so a misplaced norm shows
        for norm in (group.norm1, group.norm2, group.norm3):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
            norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 24, 31, 31)
    for group in model.blocks:
        x0 = torch.nn.functional.gelu(group.norm1(torch.nn.functional.max_pool2d(group.conv1(x), 2)))
        y = torch.nn.functional.gelu(group.norm2(group.conv2(x0)))
        expected = torch.nn.functional.gelu(x0 + group.norm3(group.conv3(y)))
        torch.testing.assert_close(group(x), expected)
        x = expected
    assert len(model.blocks) == 3 and [g.conv3.out_channels for g in model.blocks] == [64, 256, 256]


def test_fast_resnet_two_conv_groups_keep_their_state_dict_keys() -> None:
    """Bundles exported before the deep variant existed load into today's fast_resnet_* unchanged."""
    keys = set(build_model("fast_resnet_320").state_dict())
    assert not any("conv3" in k or "norm3" in k for k in keys)
    assert "blocks.2.conv2.weight" in keys and "blocks.2.norm2.running_var" in keys


# ------------------------------------------------------------------ exportability


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_build_model_exports_with_torch_export_and_a_dynamic_batch(name: str) -> None:
    """torch.export refuses data-dependent Python control flow; the program must then run at any batch."""
    model = build_model(name).eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: batch},))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-5)


def test_fit_sets_the_whitening_stem_from_every_class_of_class_ordered_data() -> None:
    """A class-folder data set decodes class by class: the stem must see a sample of all classes (the first
    5,000 images would be half the classes). Each class here has its own colour and texture, so the two
    choices give different patch covariances; the stem's filters W satisfy W^T W = (C + eps)^-1, whatever
    the eigenvectors' signs."""
    import trainer.fit as fit
    from trainer.augment import normalize
    from trainer.config import TrainConfig
    from trainer.data import DeviceData

    classes, per_class, eps = 10, 1000, 5e-4
    generator = torch.Generator().manual_seed(0)
    images = torch.cat(
        [
            (torch.rand(per_class, 3, 32, 32, generator=generator) * (20 + 20 * k) + 10 * k).clamp(0, 255)
            for k in range(classes)
        ]
    ).to(torch.uint8)
    mean, std = torch.full((3,), 0.4), torch.full((3,), 0.25)
    empty = torch.zeros(0, 3, 32, 32, dtype=torch.uint8)
    data = DeviceData(
        images, torch.arange(classes).repeat_interleave(per_class), empty, torch.zeros(0, dtype=torch.long),
        empty, torch.zeros(0, dtype=torch.long), mean, std, [str(k) for k in range(classes)], "synthetic",
    )  # fmt: skip
    state = fit.build_state(
        TrainConfig(model="fast_resnet", seed=0, channels_last=False), data, torch.device("cpu"), None
    )
    filters = state.model.whiten.weight[:12].reshape(12, 12).double()

    def inverse_covariance(sample: torch.Tensor) -> torch.Tensor:
        patches = normalize(sample, mean, std).unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 12).double()
        patches = patches - patches.mean(0)
        return torch.linalg.inv(patches.T @ patches / len(patches) + eps * torch.eye(12, dtype=torch.float64))

    built = filters.T @ filters
    every_class = torch.dist(built, inverse_covariance(images[torch.randperm(len(images), generator=generator)[:5000]]))
    first_images = torch.dist(built, inverse_covariance(images[:5000]))
    assert every_class < 0.2 * first_images, (every_class, first_images)
