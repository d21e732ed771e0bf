"""Training configuration: one argparse parser, parsed once into a frozen dataclass.

Every model has a recipe (its tuned defaults); a flag given on the command
line overrides the recipe. The resolved config is saved in every checkpoint
and as `config.json` in the run folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

from bundle.contract import IMAGE_HEIGHT
from trainer.models import DEFAULT_MODEL, INIT_SCHEMES, MODELS
from trainer.precision import PRECISIONS

# The allowed values of every choice option, stated once: the parser and the config's checks read them.
CHOICES: dict[str, tuple[str, ...]] = {
    "model": tuple(MODELS),
    "init": INIT_SCHEMES,
    "optimizer": ("sgd", "adam"),
    "schedule": ("linear", "cosine"),
    "averaging": ("none", "lookahead", "ema"),
    "precision": PRECISIONS,
    "device": ("auto", "cpu", "cuda"),
    "flip": ("alternating", "random", "none"),
}
DEFAULT_DATA = os.environ.get("CIFAR10_DATA", "data")


@dataclass(frozen=True)
class TrainConfig:
    # data
    data: str = DEFAULT_DATA
    download: bool = False
    cache_dir: str | None = None
    val_size: int = 5000  # held out of train for selection; the test set is only reported
    train_subset: int = 0  # 0: all; N: first N training images (smoke tests)
    # model
    model: str = DEFAULT_MODEL
    init: str = "default"
    # optimisation; lr is the peak, in PyTorch units for a mean loss at this batch size
    epochs: float = 10.0
    batch_size: int = 512
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    bias_lr_scale: float = 1.0  # lr multiplier for BatchNorm shifts (airbench: 64), same decay per step
    schedule: str = "linear"
    warmup: float = 0.1  # fraction of all steps spent warming up from start_lr_ratio * lr
    start_lr_ratio: float = 0.0
    final_lr_ratio: float = 0.0
    label_smoothing: float = 0.0
    averaging: str = "none"
    ema_decay: float = 0.99  # per step, for --averaging ema
    whiten_bias_epochs: float = 0.0  # fast_resnet: train the whitening bias this long, then freeze
    # augmentation
    translate: int = 4
    flip: str = "alternating"
    cutout: int = 0
    tta: int = 2  # 0: none, 1: mirror, 2: mirror + 1-px shifts
    # system
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    threads: int = 0  # 0: PyTorch's default (all cores)
    seed: int = 0
    out: str = "runs/latest"
    keep_epoch_weights: bool = False  # also save each epoch's weights (RUN/epochs/), for time-to-accuracy curves

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"--{name} {value!r} is not one of: {', '.join(allowed)}")
        checks = {
            "epochs": self.epochs > 0,
            "batch-size": self.batch_size > 0,
            "lr": self.lr > 0,
            "val-size": self.val_size >= 0,
            "train-subset": self.train_subset >= 0,
            "warmup": 0 <= self.warmup < 1,
            "label-smoothing": 0 <= self.label_smoothing < 1,
            "ema-decay": 0 <= self.ema_decay < 1,
            "translate": 0 <= self.translate <= 8,
            "cutout": 0 <= self.cutout <= IMAGE_HEIGHT,
            "tta": self.tta in (0, 1, 2),
            "threads": self.threads >= 0,
        }
        for flag, ok in checks.items():
            if not ok:
                raise ValueError(f"--{flag} {getattr(self, flag.replace('-', '_'))!r} is out of range (see --help)")


# Per-model defaults. The fast_resnet family follows airbench94: lr 11.5 per 1024 examples with a
# summed loss and momentum 0.85 is 1.5 in mean-loss units at batch 1024, so 0.75 at 512;
# its decay of 0.0153 per 1024 examples is 1.33e-3 here.
#
# The default model, fast_resnet_256 at 13 epochs, is the most accurate recipe measured that fits 15 minutes
# of wall time on the project's 2-core machine (README, benchmarks/train_targets.py). Each choice was made on
# the 5,000-image validation split (45,000 training images, seed 0, TTA level 2), never on the test set:
# - width 64/256/256 rather than 48/96/192: in about the same training time the wide net reaches more
#   (validation 90.5% after 10 epochs, against 90.0% for the narrow net after 24 epochs);
# - 13 epochs: validation 90.5% at 10 epochs and 91.1% at 14; 13 is the most that fits 900 s with a 10%
#   margin at the ~850 training images/s this machine gives it (about 60 s per epoch of 50,000 images);
# - bf16 autocast where the CPU computes bf16 natively (trainer/precision.py): 1.8x the fp32 throughput
#   (benchmarks/train_throughput.py), validation accuracy unchanged within noise (fast_resnet, 5 epochs:
#   86.2% bf16, 86.4% fp32); CPUs without it train in fp32, about 3x slower than this machine;
# - whitening statistics from a seeded sample of all classes (trainer/fit.py; README: effect over 3 seeds);
# - TTA level 2 (mirror + 1-pixel shifts): +0.15 point over mirror alone on validation (mean of two runs),
#   for about 25 s more at the end of a run.
RECIPES: dict[str, dict] = {
    "fast_resnet": dict(
        epochs=5.0,
        batch_size=512,
        lr=0.75,
        momentum=0.85,
        weight_decay=1.33e-3,
        bias_lr_scale=64.0,
        warmup=0.23,
        start_lr_ratio=0.2,
        final_lr_ratio=0.07,
        label_smoothing=0.2,
        averaging="lookahead",
        whiten_bias_epochs=3.0,
        translate=2,
        flip="alternating",
        cutout=0,
    ),
    "resnet9": dict(
        epochs=24.0,
        batch_size=512,
        lr=0.4,
        momentum=0.9,
        weight_decay=5e-4,
        warmup=5 / 24,
        translate=4,
        cutout=8,
        label_smoothing=0.0,
    ),
    "baseline_cnn": dict(
        epochs=10.0,
        batch_size=128,
        optimizer="adam",
        lr=1e-3,
        weight_decay=0.0,
        warmup=0.0,
        translate=0,
        flip="none",
        schedule="cosine",
    ),
}
RECIPES["fast_resnet_256"] = dict(RECIPES["fast_resnet"], epochs=13.0)  # the default (see above)
RECIPES["fast_resnet_512"] = dict(RECIPES["fast_resnet"], epochs=15.0)
_RESNET_RECIPE = dict(
    epochs=30.0,
    batch_size=256,
    lr=0.2,
    momentum=0.9,
    weight_decay=5e-4,
    warmup=0.05,
    schedule="cosine",
    translate=4,
    label_smoothing=0.1,
)
for _name in ("resnet18", "resnet18_deepstem", "resnet34", "resnet34_deepstem", "resnet20", "resnet32", "resnet56"):
    RECIPES[_name] = _RESNET_RECIPE

_HELP = {
    "data": "CIFAR-10 source: official cifar-10-python.tar.gz or cifar-10-batches-py/, or a class-folder "
    "tree train/<class>/*, test/<class>/* as a folder or .tar(.gz) (default: $CIFAR10_DATA or ./data)",
    "download": "download the official CIFAR-10 into --data if it is not there (needs internet)",
    "cache_dir": "where decoded arrays are cached (default: $XDG_CACHE_HOME/resnet-cifar)",
    "val_size": "training images held out for validation; all selection uses them, never the test set",
    "train_subset": "train on only the first N training images (0 = all); for smoke tests",
    "model": f"architecture: {', '.join(MODELS)}",
    "init": "weight init of trainable conv/linear layers (the seed's experiment)",
    "epochs": "training epochs (fractions allowed)",
    "batch_size": "global batch size (split across DDP ranks)",
    "optimizer": "Nesterov SGD or Adam",
    "lr": "peak learning rate (PyTorch units, mean loss over the batch)",
    "momentum": "SGD momentum (Adam: beta1)",
    "weight_decay": "L2 weight decay, as in torch.optim",
    "bias_lr_scale": "lr multiplier for BatchNorm shifts; their decay per step is kept unchanged",
    "schedule": "decay after warm-up: linear or cosine",
    "warmup": "fraction of all steps for the linear warm-up",
    "start_lr_ratio": "lr at step 0, as a fraction of --lr",
    "final_lr_ratio": "lr at the last step, as a fraction of --lr",
    "label_smoothing": "label smoothing of the cross-entropy loss",
    "averaging": "weight averaging: lookahead (airbench, every 5 steps), ema (evaluated copy) or none",
    "ema_decay": "EMA decay per step for --averaging ema",
    "whiten_bias_epochs": "fast_resnet: epochs to train the whitening-conv bias before freezing it",
    "translate": "random translation in pixels (reflect padding); 0 disables",
    "flip": "horizontal flips: alternating (airbench: each image flipped every other epoch), random, none",
    "cutout": "side of the cutout square in pixels; 0 disables",
    "tta": "test-time augmentation for the report: 0 none, 1 mirror, 2 mirror + 1-px shifts "
    "(the report always has the no-TTA figure too)",
    "device": "auto picks CUDA when available",
    "precision": "auto: bf16 autocast on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32",
    "channels_last": "NHWC memory format (faster convolutions on CPU and GPU)",
    "compile": "torch.compile the model (worth it on GPU; its warm-up is timed separately)",
    "threads": "CPU threads for PyTorch (0 = default: all cores)",
    "seed": "random seed; CPU runs with the same seed give the same weights",
    "out": "run folder for checkpoint.pt, metrics.jsonl, report.json and plots",
    "keep_epoch_weights": "also write each epoch's evaluation weights to RUN/epochs/epoch-NNN.pt (a model.pt each, "
    "scored afterwards by benchmarks/train_targets.py for time-to-accuracy curves)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.fit",
        description="Train a ResNet-family classifier on CIFAR-10. Flags left out take the model's recipe "
        "(shown as 'recipe' below) or the listed default. Multi-GPU: torchrun --nproc_per_node=N -m trainer.fit ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_recipes_epilog(),
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its checkpoint.pt with its saved config; only --device, "
        "--precision, --threads and --compile may be given again (e.g. to resume a GPU run on a CPU)",
    )
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        in_recipe = any(field.name in r for r in RECIPES.values())
        shown = "recipe" if in_recipe else repr(default)
        help_text = f"{_HELP[field.name]} (default: {shown})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind = float if field.type in ("float", float) else int if field.type in ("int", int) else str
        parser.add_argument(flag, type=kind, default=None, choices=CHOICES.get(field.name), help=help_text)
    return parser


def _recipes_epilog() -> str:
    lines = ["recipes (per-model defaults):"]
    for name, recipe in RECIPES.items():
        lines.append(
            f"  {name}: " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in recipe.items())
        )
    return "\n".join(lines)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Resolve defaults < the model's recipe < flags given on the command line."""
    given = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None
    }
    model = given.get("model", DEFAULT_MODEL)
    return TrainConfig(**{**RECIPES.get(model, {}), **given})


def config_from_dict(values: dict) -> TrainConfig:
    """Rebuild a config saved by `dataclasses.asdict` (unknown keys are an error)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"saved config has unknown keys {sorted(unknown)}; was it written by a newer version?")
    return TrainConfig(**values)


# Where and how fast a run executes, not what it computes: these may change when a run is resumed elsewhere.
RESUME_OVERRIDES = ("device", "precision", "threads", "compile")


def resume_config(saved: dict, args: argparse.Namespace) -> TrainConfig:
    """The saved config of a run being resumed, with the system flags of RESUME_OVERRIDES given again applied."""
    given = {f.name for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}
    refused = sorted(given - set(RESUME_OVERRIDES))
    if refused:
        flags = ", ".join("--" + name.replace("_", "-") for name in refused)
        allowed = ", ".join("--" + name for name in RESUME_OVERRIDES)
        raise ValueError(f"--resume continues the run with its saved config; {flags} cannot change (only {allowed})")
    config = config_from_dict(saved)
    return dataclasses.replace(config, **{name: getattr(args, name) for name in given})
