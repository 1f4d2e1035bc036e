#!/usr/bin/env bash
# One short session on a CUDA machine (about 8 minutes): the GPU table beside devinterp and
# bf16/TF32 agreement on the 21 M language model. Run from the repository root:
#
#   bash benchmarks/gpu_session.sh [OUT]        (default OUT: results/benchmarks/gpu)
#
# Needs torch with CUDA, transformers, and devinterp 1.3; where devinterp is missing, put its
# wheel in .whl/ first (pip download --no-deps devinterp==1.3.2 -d .whl) and it is installed
# from there without the network.
set -euo pipefail
OUT="${1:-${OUT:-results/benchmarks/gpu}}"
if ! python3 -c "import devinterp" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

# the language models first (the point of the session), then the small models' batching
timeout 330 python3 benchmarks/bench_llc.py --device cuda --chains 8 \
    --models lm-105m,gpt2-124m,lm-21m,lm-4m \
    --variants "devinterp,slt_probe,slt_probe bf16,slt_probe tf32" \
    --time-limit 300 --out "$OUT/language_models" || echo "language models: stopped ($?)"
timeout 120 python3 benchmarks/bench_llc.py --device cuda --chains 32 \
    --models modadd-transformer,encoder-layer,modadd-mlp \
    --variants "devinterp,slt_probe" --time-limit 100 --out "$OUT/small_models" \
    || echo "small models: stopped ($?)"
timeout 90 python3 benchmarks/precision.py --device cuda --models lm-21m --out "$OUT" \
    || echo "precision: stopped ($?)"
