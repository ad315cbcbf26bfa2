#!/bin/bash
# How the GPU numbers of bench/README.md (2026-11-26) were run: on a lent H200 machine whose image
# has PyTorch with CUDA 13 libraries and no TensorFlow. The TF 2.20 cp312 wheel (built for CUDA
# 12.5 / cuDNN 9) and the packages Model Garden imports were installed locally with
# `pip install --no-deps --target site312`, packed (tar | xz) and carried over in 63 MiB parts
# into /tmp/parts; nvidia-cuda-runtime-cu12 gave libcudart.so.12, the image's CUDA 13 cuBLAS,
# cuFFT, cuSOLVER, cuSPARSE, nvJitLink and cuDNN 9 were linked under the sonames TF 2.20 opens.
# A GPU-vs-CPU matmul/conv/XLA check runs first.
# Usage (repo root): bench/gpu_run_cuda13_image.sh check|bench
# timeout -s KILL: the trainer stops gracefully on SIGTERM, i.e. only after its current step (or
# XLA compile), and would keep the GPU's memory from the next bench.
set -u
STAGE=${1:-check}
export PYTHONUNBUFFERED=1
if [ ! -d /tmp/site312/tensorflow ]; then
  ls -la /tmp/parts
  cat /tmp/parts/site312.tar.xz.part* | xz -d -T0 | tar -x -C /tmp || { echo "UNPACK FAILED"; exit 3; }
fi
NV=$(python3 -c "import nvidia;print(list(nvidia.__path__)[0])" 2>/dev/null)
[ -z "$NV" ] && NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
mkdir -p /tmp/culib
ln -sf /tmp/site312/nvidia/cuda_runtime/lib/libcudart.so.12 /tmp/culib/libcudart.so.12
link() {  # want-soname  glob-of-real-file
  f=$(find "$NV" -name "$2" 2>/dev/null | sort | head -1)
  if [ -n "$f" ]; then ln -sf "$f" /tmp/culib/$1; else echo "MISSING $2"; fi
}
link libcublas.so.12 'libcublas.so.1[0-9]'
link libcublasLt.so.12 'libcublasLt.so.1[0-9]'
link libcufft.so.11 'libcufft.so.1[0-9]'
link libcusolver.so.11 'libcusolver.so.1[0-9]'
link libcusparse.so.12 'libcusparse.so.1[0-9]'
link libcudnn.so.9 'libcudnn.so.9'
link libnccl.so.2 'libnccl.so.2'
link libnvJitLink.so.12 'libnvJitLink.so.1[0-9]'
link libcupti.so.12 'libcupti.so.1[0-9]'
LIBDIRS=$(find "$NV" -name 'lib*.so*' -printf '%h\n' | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH=/tmp/culib:${LIBDIRS}${LD_LIBRARY_PATH:-}
export PATH=/usr/local/cuda/bin:$PATH
export XLA_FLAGS=--xla_gpu_cuda_data_dir=/usr/local/cuda
export CUDA_CACHE_MAXSIZE=4294967296
export PYTHONPATH=/tmp/site312:$PWD
export TF_CPP_MIN_LOG_LEVEL=1
ls -la /tmp/culib
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'PY' 2>&1 | grep -v "^WARNING: All log messages"
import time, numpy as np, tensorflow as tf
print("tf", tf.__version__, "built", tf.sysconfig.get_build_info().get("cuda_version"),
      tf.sysconfig.get_build_info().get("cudnn_version"), "gpus", tf.config.list_physical_devices("GPU"))
rng = np.random.default_rng(0)
a = rng.standard_normal((512, 512)).astype(np.float32)
x = rng.standard_normal((2, 64, 64, 32)).astype(np.float32)
k = rng.standard_normal((3, 3, 32, 64)).astype(np.float32)
out = {}
for dev in ("/CPU:0", "/GPU:0"):
    with tf.device(dev):
        out[dev] = (tf.linalg.matmul(a, a).numpy(), tf.nn.conv2d(x, k, 1, "SAME").numpy(),
                    tf.function(lambda t: tf.linalg.matmul(t, t), jit_compile=True)(tf.constant(a)).numpy())
for i, name in enumerate(("matmul", "conv2d", "xla_matmul")):
    c, g = out["/CPU:0"][i], out["/GPU:0"][i]
    print("CHECK", name, "max abs diff GPU vs CPU", float(np.max(np.abs(c - g))), "scale", float(np.max(np.abs(c))))
PY
[ "$STAGE" = check ] && exit 0
mkdir -p /tmp/logs
timeout -s KILL ${TRAIN_S:-330} python3 bench/train_throughput.py --batch_sizes=${BATCHES:-2,8} --variants=${VARIANTS:-fp32,fp16,xla} \
  --strategy=mirrored --total_steps=30 --log_every_steps=10 --num_images=64 --timeout_s=200 \
  --output=$OUT/gpu_train.jsonl --run_logs=/tmp/logs --workdir=/tmp/tt 2>&1 | grep -E '^\{|rror' | cut -c1-600
timeout -s KILL ${CMP_S:-200} python3 bench/compare_model_garden.py --what=inference,train --batch_sizes=2 \
  --repeats=5 --warmup=2 --output=$OUT/gpu_compare.jsonl 2>&1 | grep -E '^\{|rror' | cut -c1-600
tar -czf $OUT/logs.tgz -C /tmp logs 2>/dev/null
