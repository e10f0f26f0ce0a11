# GPU image: megatron-core + Transformer Engine (FP8) + apex + vLLM on NGC PyTorch.
#   docker build -t gad-megatron .            docker run --gpus all --ipc=host -it gad-megatron
#   (Slurm + pyxis: CONTAINER_IMAGE=docker://gad-megatron sbatch examples/gad_14b.sh)
# Versions: the NGC base brings CUDA, NCCL, PyTorch, Transformer Engine and apex; megatron-core, TE and vLLM
# are pinned to the versions setup.py pins (tests/test_packaging.py checks that they agree).
ARG BASE=nvcr.io/nvidia/pytorch:26.10-py3
FROM ${BASE}

ARG MEGATRON_CORE_VERSION=0.16.1
ARG TE_VERSION=2.20.2
ARG VLLM_VERSION=0.32.0

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/gad-megatron

# The image's torch stays: every install below is constrained to it (vLLM's wheel would otherwise pull its own).
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/constraints.txt && \
    pip install -c /tmp/constraints.txt "megatron-core==${MEGATRON_CORE_VERSION}" psutil \
        "transformer-engine[pytorch]==${TE_VERSION}" "vllm==${VLLM_VERSION}"

COPY setup.py README.md ./
COPY gad_megatron ./gad_megatron
RUN pip install -c /tmp/constraints.txt -e ".[test]" && \
    python -c "import apex, megatron.core, transformer_engine, vllm, gad_megatron; print('stack ok')"

COPY tools ./tools
COPY examples ./examples
COPY benchmarks ./benchmarks
COPY scripts ./scripts
COPY tests ./tests

# A non-root user owns the code and the default run directory.
RUN useradd --create-home --uid 1000 gad && mkdir -p /opt/gad-megatron/runs && chown -R gad /opt/gad-megatron
USER gad

# Smoke test: the stack imports, a GPU is visible, and the planner answers for the paper's 14B run.
CMD ["bash", "-c", "python -c 'import torch, megatron.core, transformer_engine, vllm; assert torch.cuda.is_available(); print(\"gad-megatron image ok:\", torch.cuda.get_device_name(0))' && gad-plan --model qwen2.5-14b --nodes 2"]
