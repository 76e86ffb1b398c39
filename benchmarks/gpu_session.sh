#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one run on a machine with one CUDA GPU, so that a
# short lease is enough. Steps (default: both, in this order):
#
#   e2e   `res2net train` against timm's train.py end to end, bf16, batch 128, all but one core
#         as loader workers, timm eager and with --torchcompile (ours compiles on CUDA, as the
#         recipe's `mode: 0` asks) (benchmarks/train_e2e.py; about 6 minutes on an H200)
#   step  correctness checks and the training/inference step against timm
#         (benchmarks/gpu_train.py; about 5 minutes, 2 of them compiling)
#
#   bash benchmarks/gpu_session.sh            # both
#   bash benchmarks/gpu_session.sh e2e        # one
#
# timm's train.py is not in the timm package, and the GPU machine may have no internet: put a
# copy of it (huggingface/pytorch-image-models, train.py) at build/timm_train.py, which git
# ignores, or name it in TIMM_TRAIN. Results go to $OUT (default benchmarks/results); the
# trainers' own logs, with ours' `data wait` (is the loader the bottleneck?), to $OUT/logs.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
timm_train=${TIMM_TRAIN:-build/timm_train.py}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # absolute: the trainers run elsewhere
mkdir -p "$out"

python -c "
import sys, torch, timm
if not torch.cuda.is_available():
    sys.exit('no CUDA GPU here: this script measures the GPU figures only')
print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())
"
steps=("$@")
if [ ${#steps[@]} -eq 0 ]; then
    steps=(e2e step)
fi
for name in "${steps[@]}"; do
    case $name in
    e2e)
        if [ ! -f "$timm_train" ]; then
            echo "no timm train.py at $timm_train: copy it there or set TIMM_TRAIN" >&2
            exit 2
        fi
        python benchmarks/train_e2e.py --timm_train "$timm_train" --precision bf16 \
            --batch_size 128 --workers $(($(nproc) - 1)) --small 64 --large 64 \
            --large_copies 80 --rounds 1 --timm_compile --keep_logs "$out/logs" \
            --out "$out/train-e2e-gpu.json"
        ;;
    step)
        gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($NF)}')
        python benchmarks/gpu_train.py --out "$out/gpu-$gpu.json"
        ;;
    *)
        echo "unknown step '$name': choose e2e or step" >&2
        exit 2
        ;;
    esac
done
