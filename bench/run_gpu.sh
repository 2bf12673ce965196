#!/usr/bin/env bash
# One command for the GPU machine: installs the package (offline), runs the GPU-marked tests and the
# benchmarks, and writes JSON + printed tables under $OUT (default bench/results/).
#
#   bash bench/run_gpu.sh                 # everything
#   bash bench/run_gpu.sh tests kernels   # a subset: tests kernels model train engines pipeline realrun profile ddp
#   GPU_TESTS="tests/test_model_gpu.py" STAGE_TIMEOUT=300 bash bench/run_gpu.sh tests
#
# Nothing here needs the network: the package installs with --no-index --no-build-isolation, and any
# missing wheels (PyAV, ...) may be carried in .whl/ beside this repo's root.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0  # never NVLink multicast on shared hosts

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ostnet-site .whl/*.whl \
    && export PYTHONPATH=/tmp/ostnet-site${PYTHONPATH:+:$PYTHONPATH}
fi
# The optional CUDA C++ extension (csrc/ext/, ostnet_fast/kernels/cuda_ext.py), built in place where nvcc is;
# OSTNET_BUILD_CUDA=0 skips it. If it does not build, everything runs on Triton alone, as without it.
rm -f ostnet_fast/_C*.so  # a build left from an earlier call would load even if this one fails or is skipped
if [ "${OSTNET_BUILD_CUDA:-1}" != 0 ] && command -v nvcc >/dev/null 2>&1; then
  OSTNET_BUILD_CUDA=1 python3 setup.py build_ext --inplace > "$OUT/cuda_ext_build.log" 2>&1 \
    && echo "run_gpu.sh: CUDA extension built ($(ls ostnet_fast/_C*.so))" \
    || echo "run_gpu.sh: the CUDA extension did not build (see $OUT/cuda_ext_build.log); Triton kernels only"
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || echo "run_gpu.sh: pip install -e . failed offline; using the source tree on PYTHONPATH"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests kernels model train engines pipeline realrun profile ddp)
T="timeout ${STAGE_TIMEOUT:-1800}"
status=0
for stage in "${stages[@]}"; do
  echo "=== $stage ==="
  case "$stage" in
    tests)    $T python3 -m pytest -q -rfE -m gpu -p no:cacheprovider ${GPU_TESTS:-tests} > "$OUT/gpu_tests.log" 2>&1 || status=1
              tail -n 30 "$OUT/gpu_tests.log" ;;
    kernels)  $T python3 bench/bench_kernels.py --out "$OUT" ${KERNEL_ARGS:-} > "$OUT/kernels.txt" 2>&1 || status=1; tail -n 80 "$OUT/kernels.txt" ;;
    model)    $T python3 bench/bench_model.py --out "$OUT" ${MODEL_ARGS:-} || status=1
              $T python3 bench/bench_conv_forms.py --out "$OUT" > "$OUT/conv_forms.txt" 2>&1 || status=1
              # the split-K convolution against cuDNN at the frame's shapes, with the tiles the model takes
              $T python3 bench/bench_conv2d.py --plan-only --out "$OUT" > "$OUT/conv2d.txt" 2>&1 || status=1 ;;
    train)    # the fused+compile rows mean something only if our ops are in the compiled graphs: count them first
              $T python3 bench/compiled_ops.py > "$OUT/compiled_ops.txt" 2>&1 || status=1
              grep -v Warning "$OUT/compiled_ops.txt" | tail -n 5
              $T python3 bench/bench_train.py --out "$OUT" ${TRAIN_ARGS:-} || status=1 ;;
    engines)  $T python3 bench/bench_engines.py --out "$OUT" ${ENGINE_ARGS:-} || status=1 ;;
    pipeline) $T python3 bench/bench_pipeline.py --out "$OUT" ${PIPELINE_ARGS:-} || status=1 ;;
    profile)  for mode in ${PROFILE_MODES:-reference fused}; do  # file names without '+' (not every copier keeps them)
                $T python3 bench/profile_train.py --mode $mode > "$OUT/profile_train_${mode//+/_}.txt" 2>&1 || status=1
                head -n 60 "$OUT/profile_train_${mode//+/_}.txt"
              done
              [ -n "${PROFILE_MODES:-}" ] && continue  # only the training modes asked for
              $T python3 bench/profile_model.py --fused --fp16 --graph --channels-last > "$OUT/profile_model.txt" 2>&1 || status=1
              head -n 40 "$OUT/profile_model.txt"
              # the fastest frame (Reenactor(backend="fused", compile=True)) with its kernels in launch order,
              # and the convolutions by shape
              $T python3 bench/profile_model.py --fused --fp16 --graph --channels-last --compile --top 60 --timeline \
                > "$OUT/profile_model_compile.txt" 2>&1 || status=1
              $T python3 bench/profile_model.py --fused --fp16 --channels-last --shapes \
                > "$OUT/profile_model_shapes.txt" 2>&1 || status=1
              grep -A12 "GPU kernel time" "$OUT/profile_model_compile.txt" ;;
    ddp)      ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
              if [ "$ngpu" -ge 2 ]; then
                $T python3 bench/ddp_scaling.py --out "$OUT/ddp" --nproc "$ngpu" ${DDP_ARGS:-} || status=1
                cp "$OUT/ddp/ddp_scaling.json" "$OUT/" 2>/dev/null
              else
                echo "run_gpu.sh: ddp needs 2 or more GPUs, this machine has $ngpu: skipped"
              fi ;;
    realrun)  $T python3 bench/real_run.py --out "$OUT/realrun" ${REALRUN_ARGS:-} || status=1
              cp "$OUT/realrun/real_run.json" "$OUT/" 2>/dev/null ;;
    *) echo "run_gpu.sh: unknown stage '$stage' (tests kernels model train engines pipeline realrun profile ddp)"; status=2 ;;
  esac
done
exit $status
