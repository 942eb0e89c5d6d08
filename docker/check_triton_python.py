"""Build-time check of the Triton image's Python side (run by docker/triton.Dockerfile).

Fails the image build, not the first request, when the Python that Triton's Python-backend stub
embeds is not what backends/ expects: Python 3.10, numpy 1.x, and onnxruntime-gpu whose CUDA
provider finds every CUDA 12 / cuDNN 9 library it links against. Needs no GPU: ``ldd`` only
resolves the shared libraries; the driver (libcuda) is loaded later, at run time.
"""

from __future__ import annotations

import os
import subprocess
import sys


def missing_libraries(shared_object: str) -> list[str]:
    """Lines of ``ldd shared_object`` that name a library the loader cannot find."""
    listing = subprocess.run(["ldd", shared_object], capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in listing.splitlines() if "not found" in line]


def main() -> int:
    import numpy
    import onnxruntime

    problems = []
    if sys.version_info[:2] != (3, 10):
        problems.append(f"Python is {sys.version.split()[0]}, the 24.10 stub embeds 3.10")
    if not numpy.__version__.startswith("1."):
        problems.append(f"numpy is {numpy.__version__}, backends/ and nvidia-pytriton need <2")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        problems.append(f"onnxruntime {onnxruntime.__version__} has no CUDA provider (CPU wheel installed?)")
    else:
        provider = os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime_providers_cuda.so")
        missing = missing_libraries(provider)
        if missing:
            problems.append(f"the CUDA provider cannot load: {'; '.join(missing)}")
    for problem in problems:
        print(f"check_triton_python: {problem}", file=sys.stderr)
    if not problems:
        print(f"check_triton_python: ok: python {sys.version.split()[0]}, numpy {numpy.__version__}, "
              f"onnxruntime {onnxruntime.__version__} with CUDA provider")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
