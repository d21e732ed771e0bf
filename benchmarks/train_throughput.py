"""Training throughput per model and precision on this machine (images/s of full SGD steps).

    python -m benchmarks.train_throughput [--models fast_resnet fast_resnet_256 ...] [--batch-size 512]

Times forward + backward + optimizer steps on random data (channels_last), in fp32
and with bf16 autocast, and reports whether the CPU has native bf16 (AVX512-BF16 or
AMX). It explains the training-time figures: the 15-minute CPU budget is a FLOP
budget, and emulated bf16 is far slower than fp32. Saves
benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bundle.contract import CHANNELS, IMAGE_HEIGHT, IMAGE_WIDTH
from trainer.models import build_model, count_parameters
from trainer.precision import autocast, cpu_has_native_bf16
from trainer.report import environment_info

RESULTS = Path(__file__).parent / "results"


def training_images_per_second(name: str, precision: str, batch_size: int, steps: int, repeats: int) -> list[float]:
    torch.manual_seed(0)
    model = build_model(name).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9, nesterov=True
    )
    x = torch.randn(batch_size, CHANNELS, IMAGE_HEIGHT, IMAGE_WIDTH).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,))
    device = torch.device("cpu")

    def step() -> None:
        with autocast(device, precision):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps * batch_size / (time.perf_counter() - start))
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=["fast_resnet", "fast_resnet_256", "resnet20", "resnet9", "resnet18"]
    )
    parser.add_argument("--bf16-models", nargs="*", default=["fast_resnet", "fast_resnet_256"],
                        help="models also timed with bf16 autocast (slow where bf16 is emulated)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per repeat (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported (default: 3)")
    parser.add_argument("--out", default=str(RESULTS / "train_throughput.json"))
    args = parser.parse_args(argv)

    native = cpu_has_native_bf16()
    rows = []
    precisions = ["fp32", "bf16"]
    for name in args.models:
        for precision in ["fp32", "bf16"] if name in args.bf16_models else ["fp32"]:
            # Emulated bf16 is ~15x slower: one short timed step is enough to show it.
            steps, repeats = (1, 1) if precision == "bf16" and not native else (args.steps, args.repeats)
            rates = training_images_per_second(name, precision, args.batch_size, steps, repeats)
            rows.append(
                {
                    "model": name,
                    "parameters": count_parameters(build_model(name)),
                    "precision": precision,
                    "images_per_s": statistics.median(rates),
                    "runs": rates,
                }
            )
            print(f"{name:<18} {precision:<5} {statistics.median(rates):8.1f} img/s", flush=True)

    env = environment_info(torch.device("cpu"), torch.get_num_threads(), 1, "fp32") | {"native_bf16": native}
    payload = {"date": datetime.date.today().isoformat(), "config": vars(args), "environment": env, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(
        f"\n{payload['date']}, {env['device_name']}, {env['torch_threads']} threads, native bf16: {native}, "
        f"batch {args.batch_size}, median of {args.repeats} x {args.steps} steps\n"
    )
    print("| model | params | " + " | ".join(f"{p} img/s" for p in precisions) + " |")
    print("|---|---:|" + "---:|" * len(precisions))
    for name in args.models:
        cells = {r["precision"]: r for r in rows if r["model"] == name}
        first = next(iter(cells.values()))
        print(
            f"| {name} | {first['parameters'] / 1e6:.2f}M | "
            + " | ".join(f"{cells[p]['images_per_s']:.0f}" if p in cells else "-" for p in precisions)
            + " |"
        )
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
