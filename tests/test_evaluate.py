"""Evaluation (trainer/evaluate.py): test-time augmentation levels, and the model's mode left as it was found.

TTA is checked two ways: on a linear model, whose logits of any view the test computes itself (views built
here by index arithmetic, as the docstring defines them), and on a small fast_resnet, where an input that a
view leaves unchanged must give exactly the plain logits. Unit tests on tiny tensors; no data set needed.
Run: `pytest tests/test_evaluate.py`.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from trainer.evaluate import predict_logits
from trainer.models import FastResNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ZERO, ONE = torch.zeros(3), torch.ones(3)  # mean and std that leave pixel / 255 as it is


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).double()


def _tiny_fast_resnet() -> FastResNet:
    torch.manual_seed(0)
    model = FastResNet(10, widths=(8, 16, 16))
    model.init_from_data(torch.randn(64, 3, 32, 32))
    with torch.no_grad():  # non-trivial BN statistics, so that train and eval mode compute different things
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


# ------------------------------------------------------------------ the views, from their definitions


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Reflect padding's index rule: -1 -> 1, size -> size - 2 (the edge pixel is not repeated)."""
    return np.abs(np.where(index >= size, 2 * (size - 1) - index, index))


def _shifted(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """out[..., i, j] = x[..., i + dy, j + dx], reflected at the borders."""
    h, w = x.shape[-2:]
    rows = _reflect(np.arange(h) + dy, h)
    cols = _reflect(np.arange(w) + dx, w)
    return x[..., rows[:, None], cols[None, :]]


def _expected_tta(model: nn.Module, images: torch.Tensor, level: int) -> np.ndarray:
    """TTA logits from the documented definition: level 1 averages the image and its mirror; level 2 gives
    that pair half the weight and the mirror pairs of the image shifted one pixel up-left and one pixel
    down-right the other half."""
    x = images.double().numpy() / 255

    def logits(view: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(view))).numpy()

    def mirror_pair(view: np.ndarray) -> np.ndarray:
        return (logits(view) + logits(view[..., ::-1])) / 2

    if level == 1:
        return mirror_pair(x)
    shifts = (mirror_pair(_shifted(x, -1, -1)) + mirror_pair(_shifted(x, 1, 1))) / 2
    return mirror_pair(x) / 2 + shifts / 2


def _plain(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(images.double() / 255).numpy()


@pytest.mark.parametrize("level", [1, 2])
def test_predict_logits_tta_averages_the_documented_views(level: int) -> None:
    reference, images = _linear_model(), _images(5)
    model = copy.deepcopy(reference).float()
    plain, tta = predict_logits(model, images, ZERO, ONE, tta=level, channels_last=False, batch_size=2)
    np.testing.assert_allclose(plain.numpy(), _plain(reference, images), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tta.numpy(), _expected_tta(reference, images, level), rtol=1e-4, atol=1e-5)
    assert np.abs(tta.numpy() - plain.numpy()).max() > 1e-2, "TTA must change the logits of these images"
    other_level = _expected_tta(reference, images, 3 - level)
    assert np.abs(tta.numpy() - other_level).max() > 1e-2, "the two levels must differ on these images"


def test_predict_logits_tta_level_0_is_the_plain_logits() -> None:
    reference, images = _linear_model(), _images(3)
    plain, tta = predict_logits(copy.deepcopy(reference).float(), images, ZERO, ONE, tta=0, channels_last=False)
    assert torch.equal(plain, tta)
    np.testing.assert_allclose(plain.numpy(), _plain(reference, images), rtol=1e-4, atol=1e-5)


def _mirror_symmetric(images: torch.Tensor) -> torch.Tensor:
    """Each image's left half mirrored onto its right half: the image equals its mirror."""
    return torch.cat([images[..., :16], images[..., :16].flip(-1)], dim=-1)


@pytest.mark.parametrize("channels_last", [False, True])
def test_predict_logits_tta_of_a_mirror_symmetric_image_is_the_plain_logits(channels_last: bool) -> None:
    """Level 1's two views of a symmetric image are the same image: TTA must give the plain logits (a real
    model: BatchNorm, the whitening stem); an asymmetric image must not."""
    model = _tiny_fast_resnet().eval()
    symmetric = _mirror_symmetric(_images(4))
    assert torch.equal(symmetric, symmetric.flip(-1))
    plain, tta = predict_logits(model, symmetric, ZERO, ONE, tta=1, channels_last=channels_last)
    torch.testing.assert_close(tta, plain, rtol=0, atol=1e-6)
    plain, tta = predict_logits(model, _images(4), ZERO, ONE, tta=1, channels_last=channels_last)
    assert (tta - plain).abs().max() > 1e-3


def test_predict_logits_tta_level_2_of_a_flat_image_is_the_plain_logits() -> None:
    """A flat image is unchanged by mirroring and by one-pixel shifts with reflect padding: all six views of
    level 2 are the same image."""
    model = _tiny_fast_resnet().eval()
    colours = torch.tensor([[40, 120, 200], [0, 90, 255], [17, 17, 17], [250, 5, 60]], dtype=torch.uint8)
    flat = colours.view(4, 3, 1, 1).expand(4, 3, 32, 32)
    plain, tta = predict_logits(model, flat.contiguous(), ZERO, ONE, tta=2)
    torch.testing.assert_close(tta, plain, rtol=0, atol=1e-6)
    symmetric = _mirror_symmetric(_images(4))  # mirror-symmetric but not shift-invariant: level 2 differs
    plain, tta = predict_logits(model, symmetric, ZERO, ONE, tta=2)
    assert (tta - plain).abs().max() > 1e-3


# ------------------------------------------------------------------ train/eval mode


@pytest.mark.parametrize("tta", [0, 2])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_predict_logits_evaluates_in_eval_mode_and_restores_the_mode(mode: str, tta: int) -> None:
    model = _tiny_fast_resnet().train(mode == "train")
    state_before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        want = copy.deepcopy(model).eval()(_images(6).float() / 255)
    plain, _ = predict_logits(model, _images(6), ZERO, ONE, tta=tta)
    torch.testing.assert_close(plain, want, rtol=1e-4, atol=1e-5)  # BatchNorm used its running statistics
    assert [m.training for m in model.modules()] == [mode == "train"] * len(list(model.modules()))
    for key, value in model.state_dict().items():  # no BatchNorm statistics updated by evaluation
        assert torch.equal(value, state_before[key]), key


def test_predict_logits_restores_the_mode_when_the_model_fails() -> None:
    class Failing(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    model = Failing().train()
    with pytest.raises(RuntimeError, match="boom"):
        predict_logits(model, _images(2), ZERO, ONE)
    assert model.training


def test_predict_logits_averages_bf16_views_in_fp32() -> None:
    """Under bf16 autocast each view's logits come out in bf16; TTA must average them as float32 (averaging in
    bf16 rounds the mean to 8 bits of mantissa and can flip close top-1 calls)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 30 * 30, 10)).eval()
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    _, tta = predict_logits(model, images, mean, std, tta=1, precision="bf16", channels_last=False)
    x = (images.float() / 255 - 0.5) / 0.25
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain, mirror = model(x).float(), model(x.flip(-1)).float()
    assert tta.dtype == torch.float32
    torch.testing.assert_close(tta, 0.5 * (plain + mirror), rtol=0, atol=0)
    assert not torch.equal(tta, (0.5 * (plain.bfloat16() + mirror.bfloat16())).float()), "bf16 averaging would pass too"
