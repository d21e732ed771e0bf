#!/usr/bin/env bash
# Put what benchmarks.gpu_run reads into the git-ignored .data/ folder, on the CPU machine, before a GPU run:
# the GPU machine gets a copy of the repository's working tree (plus the ignored paths a run carries), never
# ../shared.
#
#   benchmarks/gpu_prepare.sh [SHARED_DIR]        # default SHARED_DIR: ../shared beside the repository
#
# Then print the plan (which steps and seeds fit the budget; runs nothing), and on the GPU machine (device tool:
# carry [".data"], timeout_s 600), from the repository root, run it:
#
#   python -m benchmarks.gpu_run --plan
#   PYTHONUNBUFFERED=1 PYTHONPATH=. python3 -m benchmarks.gpu_run --out "$OUT"
#
# .data/ receives cifar10-jpeg.tar.gz (19.4 MB), peers/airbench94.py with its LICENSE, and revision.txt (the
# commit and date, recorded in the results). A run carries at most 64 MiB, tracked files included: nothing
# else (no data cache, no run folders) belongs in .data/.
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${1:-../shared}"
data="$shared/datasets/cifar10-jpeg.tar.gz"
peer="$shared/peers/airbench"
for file in "$data" "$peer/airbench94.py" "$peer/LICENSE"; do
    if [[ ! -f "$file" ]]; then
        echo "error: $file not found; pass the shared folder: benchmarks/gpu_prepare.sh /path/to/shared" >&2
        exit 2
    fi
done
mkdir -p .data/peers
install -m 644 "$data" .data/cifar10-jpeg.tar.gz
install -m 644 "$peer/airbench94.py" .data/peers/airbench94.py
install -m 644 "$peer/LICENSE" .data/peers/LICENSE.airbench
echo "$(git describe --always --dirty 2>/dev/null || echo unknown) prepared $(date -u +%Y-%m-%dT%H:%M:%SZ)" > .data/revision.txt
git check-ignore -q .data || { echo "error: .data/ is not git-ignored" >&2; exit 1; }
carried=$(du -sk .data | cut -f1)
tracked=$(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
echo "prepared .data/ ($((carried / 1024)) MiB; tracked files $((tracked / 1024)) MiB; a run carries at most 64 MiB):"
ls -l .data .data/peers
if (( carried + tracked > 60 * 1024 )); then
    echo "error: .data/ and the tracked files add up to over 60 MiB: remove what gpu_run does not need from .data/" >&2
    exit 1
fi
