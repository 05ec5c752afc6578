"""Installs megaolmo; the top-level `kernels/` folder becomes `megaolmo.kernels`.

`kernels` must never be a top-level module: PyPI's `kernels` package exists and
transformers probes for it, so a stray top-level `kernels` would be picked up.
"""

from setuptools import setup

setup(
    name="megaolmo",
    version="0.1.0",
    description="Megatron-style 3D-parallel training of OLMo language models",
    python_requires=">=3.10",
    packages=[
        "megaolmo",
        "megaolmo.model",
        "megaolmo.parallel",
        "megaolmo.bench",
        "megaolmo.data",
        "megaolmo.eval",
        "megaolmo.kernels",
    ],
    package_dir={"megaolmo.kernels": "kernels"},
    install_requires=[
        "torch>=2.11,<2.15",
        "numpy",
        "safetensors",
        "pyyaml",
        "hydra-core>=1.3.2",
        "hydra-submitit-launcher>=1.2",  # sweeps as Slurm jobs: hydra/launcher=submitit_slurm
        "tokenizers",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-timeout",  # pytest.ini: timeout = 300 per test
            "transformers>=4.48",
            "tokenizers",
            "safetensors",
            "ruff",
            "triton>=3.6,<3.10",
            "megatron-core",
            "torchao",
        ],
        "te": ["transformer-engine[pytorch]"],
        "flash": ["flash-attn"],
        "liger": ["liger-kernel"],
        "torchao": ["torchao"],
    },
)
