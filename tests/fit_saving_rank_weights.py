"""`python -m trainer.fit ARGS`, unchanged, plus each rank's final weights saved to OUT/rank<RANK>.pt.

Only rank 0 writes the run folder, so the DDP test launches this under `torch.distributed.run` to see the
weights every rank ends with. It wraps `trainer.fit.build_state` to keep the training state it returns, then
runs the real `trainer.fit.main`. Run: `python tests/fit_saving_rank_weights.py ARGS` (repository on PYTHONPATH).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import trainer.fit as fit


def main(argv: list[str]) -> int:
    states = []
    build_state = fit.build_state

    def keeping_build_state(*args, **kwargs):
        state = build_state(*args, **kwargs)
        states.append(state)
        return state

    fit.build_state = keeping_build_state
    status = fit.main(argv)
    if status == 0:
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        torch.save(states[-1].model.state_dict(), out / f"rank{os.environ.get('RANK', '0')}.pt")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
