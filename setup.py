"""unirl_fast: fused GPU ops and a lean trainer for RL on unified multimodal models.

`kernels/` (Triton kernels) is installed inside the package as `unirl_fast.kernels`: a top-level
module named `kernels` would clash with Hugging Face's `kernels` package (see unirl_fast/__init__.py for
why the folder has no __init__.py). The ranges below are what the code needs; `constraints.txt` pins the
exact versions CI passed with (the README's install uses it).
"""
from setuptools import find_packages, setup

setup(
    name="unirl-fast",
    version="0.1.0",
    description="Fused Triton ops and a lean trainer for RL on unified (LM + diffusion) models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["unirl_fast", "unirl_fast.*"]) + ["unirl_fast.kernels"],
    package_dir={"unirl_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        # Triton ships Linux x86_64 wheels only; elsewhere the reference ops still work.
        "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
        # 5.5.4: the oldest the real-run tests pass with (5.4 has the PIL Qwen2-VL image processor and the
        # mm_token_type_ids get_rope_index the VLM expert uses, but its processor still needs torchvision, and
        # 5.5.0-5.5.3 decode at the rope offsets 1e-3 off a full forward); tested with 5.5.4, 5.17, 5.24, 5.25
        # (5.25 imports Hugging Face's `kernels`, which our kernels/ folder must not shadow; 5.5.x in turn fails to
        # import with kernels 0.19: pin kernels<0.13 if you must stay on 5.5)
        "transformers>=5.5.4",
        "numpy",
        "nvidia-ml-py",
        "tqdm",
        "safetensors",
        "matplotlib",  # the trainer's reward curves and sample grids
        "pillow",  # task images, PNGs of the reward-service protocol
        "pyyaml",  # `unirl-fast train --config-file run.yaml`
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-benchmark", "hypothesis", "ruff"],
        "diffusion": ["diffusers>=0.32"],
        "deepspeed": ["deepspeed>=0.19"],  # ZeRO-2/3 scale-out; tested with 0.19.8 (CPU, gloo)
        "flash": ["flash-attn"],
        "bench": ["liger-kernel", "matplotlib"],
        "trl": ["trl==1.16.0"],  # the version the TRL integration is tested against
        "lora": ["peft>=0.21.2"],  # LoRA on the experts (--lora-lm / --lora-dit); tested with peft 0.21.2 and 0.22.0
        "data": ["datasets"],  # task sources from Hugging Face `datasets` directories (--tasks DIR)
        "verl": ["verl==0.9.1"],  # the version the verl drop-in is tested against (install it in its own venv)
        # experiment trackers for --report-to (tests/test_trackers.py, offline modes on CPU: tensorboard 2.21.0,
        # wandb 0.31.0, mlflow-skinny 3.18.0, trackio 0.45.1)
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        "mlflow": ["mlflow-skinny"],
        "trackio": ["trackio"],
    },
    entry_points={"console_scripts": ["unirl-fast=unirl_fast.cli:main"]},
)
