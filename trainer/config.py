"""Training configuration: one argparse parser, parsed once into a frozen dataclass.

Every model has a recipe (its tuned defaults); a flag given on the command
line overrides the recipe. The resolved config is saved in every checkpoint
and as `config.json` in the run folder.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import Field, dataclass, field, fields

from bundle.class_tree import DATA_ENV, data_source
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
DEFAULT_DATA = str(data_source("data"))


def _option(
    default: object,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
):  # type: ignore[no-untyped-def]
    """A config field with its --help text and its allowed range beside it (checked in __post_init__)."""
    return field(default=default, metadata={"help": help, "range": (low, high, low_open, high_open)})


@dataclass(frozen=True)
class TrainConfig:
    # data
    data: str = _option(
        DEFAULT_DATA,
        "CIFAR-10 source: official cifar-10-python.tar.gz or cifar-10-batches-py/, or a class-folder "
        f"tree train/<class>/*, test/<class>/* as a folder or .tar(.gz) (default: ${DATA_ENV} or ./data)",
    )
    download: bool = _option(False, "download the official CIFAR-10 into --data if it is not there (needs internet)")
    cache_dir: str | None = _option(None, "where decoded arrays are cached (default: $XDG_CACHE_HOME/resnet-cifar)")
    val_size: int = _option(
        5000, "training images held out for validation; all selection uses them, never the test set", low=0
    )
    train_subset: int = _option(0, "train on only the first N training images (0 = all); for smoke tests", low=0)
    # model
    model: str = _option(DEFAULT_MODEL, f"architecture: {', '.join(MODELS)}")
    init: str = _option("default", "weight init of trainable conv/linear layers (the seed's experiment)")
    # optimisation; lr is the peak, in PyTorch units for a mean loss at this batch size
    epochs: float = _option(10.0, "training epochs (fractions allowed)", low=0, low_open=True)
    batch_size: int = _option(512, "global batch size (split across DDP ranks)", low=1)
    optimizer: str = _option("sgd", "Nesterov SGD or Adam")
    lr: float = _option(0.1, "peak learning rate (PyTorch units, mean loss over the batch)", low=0, low_open=True)
    momentum: float = _option(0.9, "SGD momentum (Adam: beta1)")
    weight_decay: float = _option(5e-4, "L2 weight decay, as in torch.optim")
    bias_lr_scale: float = _option(
        1.0, "lr multiplier for BatchNorm shifts (airbench: 64); their decay per step is kept"
    )
    schedule: str = _option("linear", "decay after warm-up: linear or cosine")
    warmup: float = _option(0.1, "fraction of all steps for the linear warm-up", low=0, high=1, high_open=True)
    start_lr_ratio: float = _option(0.0, "lr at step 0, as a fraction of --lr")
    final_lr_ratio: float = _option(0.0, "lr at the last step, as a fraction of --lr")
    label_smoothing: float = _option(0.0, "label smoothing of the cross-entropy loss", low=0, high=1, high_open=True)
    averaging: str = _option(
        "none", "weight averaging: lookahead (airbench, every 5 steps), ema (evaluated copy) or none"
    )
    ema_decay: float = _option(0.99, "EMA decay per step for --averaging ema", low=0, high=1, high_open=True)
    whiten_bias_epochs: float = _option(0.0, "fast_resnet: epochs to train the whitening-conv bias before freezing it")
    # augmentation
    translate: int = _option(4, "random translation in pixels (reflect padding); 0 disables", low=0, high=8)
    flip: str = _option(
        "alternating", "horizontal flips: alternating (airbench: each image flipped every other epoch), random, none"
    )
    cutout: int = _option(0, "side of the cutout square in pixels; 0 disables", low=0, high=IMAGE_HEIGHT)
    tta: int = _option(
        2,
        "test-time augmentation for the report: 0 none, 1 mirror, 2 mirror + 1-px shifts "
        "(the report always has the no-TTA figure too)",
        low=0,
        high=2,
    )
    # system
    device: str = _option("auto", "auto picks CUDA when available")
    precision: str = _option(
        "auto", "auto: bf16 autocast on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32"
    )
    channels_last: bool = _option(True, "NHWC memory format (faster convolutions on CPU and GPU)")
    compile: bool = _option(
        False, "torch.compile the model (for GPUs; its warm-up is timed separately; refused on CPU with bf16)"
    )
    threads: int = _option(0, "CPU threads for PyTorch (0 = default: all cores)", low=0)
    seed: int = _option(0, "random seed; CPU runs with the same seed give the same weights")
    out: str = _option("runs/latest", "run folder for checkpoint.pt, metrics.jsonl, report.json and plots")
    keep_epoch_weights: bool = _option(
        False,
        "also write each epoch's evaluation weights to RUN/epochs/epoch-NNN.pt (a model.pt each, scored "
        "afterwards by benchmarks/train_targets.py for time-to-accuracy curves)",
    )

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"--{name} {value!r} is not one of: {', '.join(allowed)}")
        for f in fields(self):
            value = getattr(self, f.name)
            low, high, low_open, high_open = f.metadata["range"]
            above = low is None or (value > low if low_open else value >= low)
            below = high is None or (value < high if high_open else value <= high)
            if not (above and below):
                raise ValueError(
                    f"--{f.name.replace('_', '-')} {value!r} is out of range: it must be {allowed_range(f)}"
                )


def allowed_range(f: Field) -> str:
    """A field's allowed range in words ("" when any value goes)."""
    low, high, low_open, high_open = f.metadata["range"]
    words = []
    if low is not None:
        words.append(f"{'more than' if low_open else 'at least'} {low:g}")
    if high is not None:
        words.append(f"{'less than' if high_open else 'at most'} {high:g}")
    return " and ".join(words)


# Per-model defaults. The fast_resnet family follows airbench94: lr 11.5 per 1024 examples with a
# summed loss and momentum 0.85 is 1.5 in mean-loss units at batch 1024, so 0.75 at 512;
# its decay of 0.0153 per 1024 examples is 1.33e-3 here.
#
# The default model, fast_resnet_256 at 13 epochs, is the most accurate recipe measured that fits 15 minutes
# of wall time on the project's 2-core machine (benchmarks/README.md, benchmarks/train_targets.py). Each choice was made on
# the 5,000-image validation split (45,000 training images, seed 0, TTA level 2), never on the test set:
# - width 64/256/256 rather than 48/96/192: in about the same training time the wide net reaches more
#   (validation 90.5% after 10 epochs, against 90.0% for the narrow net after 24 epochs);
# - 13 epochs: validation 90.5% at 10 epochs and 91.1% at 14; 13 is the most that fits 900 s with a 10%
#   margin at the ~850 training images/s this machine gives it (about 60 s per epoch of 50,000 images);
# - bf16 autocast where the CPU computes bf16 natively (trainer/precision.py): 1.8x the fp32 throughput
#   (benchmarks/train_throughput.py), validation accuracy unchanged within noise (fast_resnet, 5 epochs:
#   86.2% bf16, 86.4% fp32); CPUs without it train in fp32, about 3x slower than this machine;
# - whitening statistics from a seeded sample of all classes (trainer/fit.py; benchmarks/README.md: effect over 3 seeds);
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
RECIPES["fast_resnet_320"] = dict(RECIPES["fast_resnet"], epochs=13.0)
# airbench96's schedule and augmentation: lr and weight decay x0.78 of airbench94's (9.0 / 11.5 and 0.012 /
# 0.0153 per 1024 examples), warm-up 10% of the steps, decay to zero; translate 4, cutout 12
RECIPES["fast_resnet_deep"] = dict(
    RECIPES["fast_resnet"],
    epochs=13.0,
    lr=0.587,
    weight_decay=1.043e-3,
    warmup=0.1,
    final_lr_ratio=0.0,
    translate=4,
    cutout=12,
)
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
    for option in dataclasses.fields(TrainConfig):
        flag = "--" + option.name.replace("_", "-")
        default = getattr(defaults, option.name)
        in_recipe = any(option.name in r for r in RECIPES.values())
        shown = "recipe" if in_recipe else repr(default)
        rule = allowed_range(option)
        help_text = f"{option.metadata['help']} (default: {shown}{'; ' + rule if rule else ''})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind = float if option.type in ("float", float) else int if option.type in ("int", int) else str
        parser.add_argument(flag, type=kind, default=None, choices=CHOICES.get(option.name), help=help_text)
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
