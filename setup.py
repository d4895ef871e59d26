"""Install Apogee: `pip install -e ".[dev]"` (after `pip install torch==2.13.0` on CPU machines).

The C++ dataset index builders in csrc/ are compiled into `data_pipeline._helpers`.
"""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "data_pipeline._helpers",
        ["csrc/helpers.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

setup(
    name="apogee",
    version="0.1.0",
    description="Megatron-style 4D-parallel pretraining engine for decoder-only LLMs",
    python_requires=">=3.10",
    packages=[
        "parallel", "data_pipeline", "engine", "engine.model", "engine.train", "engine.state",
        "engine.model.fp8", "engine.resilience", "engine.perf", "engine.job", "engine.eval", "stages", "stages.grpo", "slurm", "cli",
    ],
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.60",
        "tensorboard>=2.12",
        "safetensors>=0.4",
        "tokenizers>=0.15",
        "pyarrow>=12",  # preprocess reads Parquet and `datasets` save_to_disk (Arrow) corpora
        "zstandard>=0.18",  # and .jsonl.zst
        "jinja2>=3.1.6",  # chat templates, rendered in its immutable sandbox (older releases have escapes)
    ],
    extras_require={
        # pytest-timeout: a hung test fails alone instead of the whole CI run; datasets: test fixtures; lm_eval: the lm-evaluation-harness test; matplotlib: apogee eval --plot
        "dev": ["pytest>=7", "pytest-timeout>=2.1", "megatron-core>=0.16", "transformers>=4.45", "datasets>=2.14", "lm_eval[hf]>=0.4",
                "matplotlib>=3.5"],
        "plot": ["matplotlib>=3.5"],
        "gpu": ["transformer_engine[pytorch]", "nvidia-dali-cuda120"],  # fp8 through TE on CUDA (engine/model/fp8/te.py)
        "mpi": ["mpi4py>=3.1"],
    },
    entry_points={"console_scripts": ["apogee = cli.main:main"]},
)
