from setuptools import find_packages, setup

setup(
    name="increlora_fast",
    version="0.1.0",
    description="IncreLoRA fine-tuning on fixed-shape slot buffers with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["increlora_fast", "increlora_fast.*"]),
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "transformers>=4.40",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        "finetune": ["matplotlib>=3.7", "peft>=0.10"],
        "memory": ["accelerate>=0.26", "peft>=0.10"],
        "trl": ["trl>=0.20", "datasets>=2.14"],
        "dev": ["pytest>=7", "pytest-xdist>=3.2", "pytest-benchmark>=4", "peft>=0.10", "datasets>=2.14",
                "matplotlib>=3.7", "accelerate>=0.26", "trl>=0.20",
                # 4-bit and 8-bit bases: runs forward and backward on CPU, so CI tests them
                "bitsandbytes>=0.50"],
    },
    entry_points={"console_scripts": ["increlora-fast=increlora_fast.cli.main:main"]},
)
