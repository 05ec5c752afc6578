"""Installs megaolmo; the top-level `kernels/` and `conf/` folders become `megaolmo.kernels` and `megaolmo.conf`.

`kernels` must never be a top-level module: PyPI's `kernels` package exists and
transformers probes for it, so a stray top-level `kernels` would be picked up.
`conf/` is the Hydra tree that `python -m megaolmo.train` and `megaolmo.plan`
compose; a wheel ships it as package data, so an installed megaolmo needs no checkout.
"""

from setuptools import find_packages, setup

setup(
    name="megaolmo",
    version="0.1.0",
    description="Megatron-style 3D-parallel training of OLMo language models",
    python_requires=">=3.10",
    packages=find_packages(include=["megaolmo", "megaolmo.*"]) + ["megaolmo.kernels", "megaolmo.conf"],
    package_dir={"megaolmo.kernels": "kernels", "megaolmo.conf": "conf"},
    package_data={"megaolmo.conf": ["*.yaml", "*/*.yaml"]},  # config.yaml and every group's options
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
            "zstandard",
        ],
        "te": ["transformer-engine[pytorch]"],
        "zstd": ["zstandard"],  # Dolma's *.json.zst shards (megaolmo.data.jsonl says so when it is missing)
        "flash": ["flash-attn"],
        "liger": ["liger-kernel"],
        "torchao": ["torchao"],
    },
)
