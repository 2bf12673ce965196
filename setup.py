import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "ostnet_fast" / "_version.py").read_text(), version)

# The CUDA C++ extension (csrc/ext/) is optional and built only on request, where nvcc and a CUDA build of
# torch are installed: OSTNET_BUILD_CUDA=1 pip install --no-build-isolation -e .
# (--no-build-isolation: it compiles against the torch already installed, not a fresh download).
ext_modules, cmdclass = [], {}
if os.environ.get("OSTNET_BUILD_CUDA") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext_modules = [CUDAExtension("ostnet_fast._C", ["csrc/ext/grid_sample_small_c.cu"],
                                 extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]})]
    cmdclass = {"build_ext": BuildExtension}

setup(
    name="ostnet-fast",
    version=version["__version__"],
    description="OSTNet one-shot talking-head reenactment: training, fused GPU kernels, ONNX/TensorRT export",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "ostnet_fast", "ostnet_fast.model", "ostnet_fast.kernels", "ostnet_fast.train",
        "ostnet_fast.data", "ostnet_fast.pipeline", "ostnet_fast.runtime", "ostnet_fast.export", "ostnet_fast.configs",
    ],
    # The YAML configs live at the top level (configs/) and ship inside the package.
    package_dir={"ostnet_fast.configs": "configs"},
    package_data={"ostnet_fast.configs": ["*.yaml"]},
    # A floor, not a pin: the user's CUDA build of torch is kept.
    install_requires=["torch>=2.4", "numpy", "pyyaml", "safetensors>=0.4", "tqdm", "pillow"],
    extras_require={
        "video": ["av>=12", "scikit-video>=1.1.11", "scikit-image"],
        "export": ["onnx>=1.15", "onnxruntime>=1.17", "onnx-graphsurgeon>=0.5", "polygraphy>=0.49",
                   "onnxscript"],
        "train": ["av>=12", "tensorboard"],
        # MTCNN: facenet-pytorch's metadata pins torch<2.3, so it installs with --no-deps (README);
        # this extra brings only its small runtime dependency.
        "face": ["requests"],
        # AKD / AED (eval --face-metrics): dlib-bin is dlib prebuilt (no compiler), imported as `dlib`.
        "face-metrics": ["dlib-bin", "face-recognition-models"],
        "bench": ["pytest-benchmark"],  # bench/bench_pipeline.py records through it when installed
        "triton": ["triton>=3.0"],
        # Builds TensorRT engines on a CPU-only machine (runs them on RTX-class GPUs only).
        "tensorrt-rtx": ["tensorrt-rtx-cu13-libs", "tensorrt-rtx-cu13-bindings"],
        "dev": ["pytest>=8", "triton>=3.0", "av>=12", "scikit-video>=1.1.11", "scikit-image",
                "onnx>=1.15", "onnxruntime>=1.17", "onnx-graphsurgeon>=0.5", "polygraphy>=0.49",
                "onnxscript", "dlib-bin", "face-recognition-models"],
    },
    entry_points={"console_scripts": ["ostnet-fast=ostnet_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
