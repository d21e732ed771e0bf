"""Evaluation: logits with and without test-time augmentation, accuracy, per-class accuracy, confusion; the
validation check after each epoch and the final report's figures."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from trainer.augment import normalize
from trainer.models import count_parameters
from trainer.precision import autocast

if TYPE_CHECKING:
    from trainer.config import TrainConfig
    from trainer.data import DeviceData
    from trainer.engine import TrainState


def _logits(model: nn.Module, x: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    """The model's logits in float32, whatever precision it computed them in (TTA averages in fp32)."""
    with autocast(device, precision):
        return model(x).float()


def _mirror_logits(
    model: nn.Module, x: torch.Tensor, device: torch.device, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    plain = _logits(model, x, device, precision)
    return plain, 0.5 * (plain + _logits(model, x.flip(-1), device, precision))


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    tta: int = 0,
    batch_size: int = 1000,
    precision: str = "fp32",
    channels_last: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of uint8 (N, 3, H, W) images: (plain, with TTA), both float32 on the CPU.

    TTA levels (airbench94): 1 averages the image and its mirror; 2 also averages
    the mirror pair of the image shifted one pixel up-left and down-right.
    """
    was_training = model.training
    model.eval()
    device = images.device
    plain_out, tta_out = [], []
    try:
        for start in range(0, len(images), batch_size):
            x = normalize(images[start : start + batch_size], mean, std)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if tta == 0:
                plain = tta_logits = _logits(model, x, device, precision)
            else:
                plain, tta_logits = _mirror_logits(model, x, device, precision)
            if tta == 2:
                padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
                h, w = x.shape[-2:]
                shifted = [padded[:, :, :h, :w], padded[:, :, 2 : h + 2, 2 : w + 2]]
                shifted_logits = torch.stack([_mirror_logits(model, s, device, precision)[1] for s in shifted]).mean(0)
                tta_logits = 0.5 * tta_logits + 0.5 * shifted_logits
            plain_out.append(plain.cpu())
            tta_out.append(tta_logits.cpu())
    finally:
        model.train(was_training)
    return torch.cat(plain_out), torch.cat(tta_out)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels.cpu()).float().mean().item()


def classification_report(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict:
    """Overall and per-class accuracy (as the seed's accuracy_monitor) and the confusion matrix
    (rows: true class, columns: predicted)."""
    labels = labels.cpu()
    predicted = logits.argmax(1)
    k = len(class_names)
    confusion = torch.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
    per_class = confusion.diag().float() / confusion.sum(1).clamp(min=1).float()
    return {
        "accuracy": (predicted == labels).float().mean().item(),
        "per_class_accuracy": {name: per_class[i].item() for i, name in enumerate(class_names)},
        "confusion_matrix": confusion.tolist(),
    }


def validate(state: TrainState, data: DeviceData, config: TrainConfig, precision: str) -> float | None:
    """Accuracy of the evaluated weights on the validation split (None without one); no TTA."""
    if not len(data.val_images):
        return None
    logits, _ = predict_logits(
        state.eval_model,
        data.val_images,
        data.mean,
        data.std,
        tta=0,
        precision=precision,
        channels_last=config.channels_last,
    )
    return accuracy(logits, data.val_labels)


def final_evaluation(state: TrainState, data: DeviceData, config: TrainConfig, precision: str) -> dict:
    """Test (and validation) accuracy with and without TTA. The test set is only reported, never used for a choice."""

    def logits(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return predict_logits(
            state.eval_model,
            images,
            data.mean,
            data.std,
            tta=config.tta,
            precision=precision,
            channels_last=config.channels_last,
        )

    test_plain, test_tta = logits(data.test_images)
    result = {
        "model": config.model,
        "parameters": count_parameters(state.model),
        "class_names": data.class_names,
        "test": classification_report(test_plain, data.test_labels, data.class_names),
        "test_tta": {"level": config.tta, **classification_report(test_tta, data.test_labels, data.class_names)},
    }
    if len(data.val_images):
        val_plain, val_tta = logits(data.val_images)
        result["val"] = {
            "accuracy": accuracy(val_plain, data.val_labels),
            "accuracy_tta": accuracy(val_tta, data.val_labels),
        }
    return result
