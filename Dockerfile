# GPU image: torch + vLLM + megatron-core + Transformer Engine (FP8) + apex on one torch, CUDA 13, Python 3.12.
#   docker build -t gad-megatron .            docker run --gpus all --ipc=host -it gad-megatron   (runs gad-doctor)
#   Slurm + pyxis: CONTAINER_IMAGE=docker://gad-megatron sbatch examples/gad_14b.sh
# Why not NGC's PyTorch image: its torch is always a pre-release build (2.13.0a0+...nv26.x), which never satisfies
# vLLM's exact pin (torch==2.13.0), and replacing it breaks the TE and apex compiled into the image. So the base is
# CUDA's devel image (the compilers TE's torch extension and apex need) and every version is in one file,
# docker/constraints.txt. tests/network/test_image_resolution.py runs pip's resolver on exactly the lines below.
ARG BASE=nvidia/cuda:13.0.1-devel-ubuntu24.04
FROM ${BASE}

# apex is not on PyPI (the PyPI "apex" is another project): NVIDIA's repository at a fixed release tag.
ARG APEX_REF=25.04
ARG BUILD_APEX=1
# Hopper and Blackwell (FP8); add 8.0 for A100 (BF16 only).
ARG TORCH_CUDA_ARCH_LIST="9.0;10.0"
ARG MAX_JOBS=16
ARG GAD_USER=gad

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:${PATH} \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} MAX_JOBS=${MAX_JOBS} NVTE_FRAMEWORK=pytorch \
    CUDA_DEVICE_MAX_CONNECTIONS=1

RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.12 python3.12-dev python3.12-venv git build-essential ninja-build ca-certificates && \
    rm -rf /var/lib/apt/lists/* && \
    python3.12 -m venv /opt/venv && pip install --upgrade pip setuptools wheel
WORKDIR /opt/gad-megatron

# 1. Binary wheels, one resolution, one torch (vLLM's pin).
COPY docker/ ./docker/
RUN pip install -c docker/constraints.txt -r docker/requirements.txt

# 2. docker/source-built.txt, compiled against the torch from step 1 (--no-build-isolation; pip's isolated build
#    would compile against a freshly downloaded torch instead).
RUN pip install --no-build-isolation -c docker/constraints.txt transformer_engine_torch && \
    python -c "import transformer_engine.pytorch"
RUN if [ "${BUILD_APEX}" = 1 ]; then \
      APEX_CPP_EXT=1 APEX_CUDA_EXT=1 pip install -v --no-build-isolation \
        --config-settings "--build-option=--cpp_ext --cuda_ext --parallel 8" \
        "apex @ git+https://github.com/NVIDIA/apex.git@${APEX_REF}"; \
    fi

# 3. This project, its other dependencies constrained to the same stack.
COPY setup.py README.md ./
COPY gad_megatron ./gad_megatron
RUN pip install -c docker/constraints.txt -e ".[test]" && \
    python -c "import megatron.core, transformer_engine, vllm, gad_megatron; print('stack ok')"

COPY tools ./tools
COPY examples ./examples
COPY benchmarks ./benchmarks
COPY scripts ./scripts
COPY tests ./tests

# A non-root user owns the code and the default run directory. No fixed uid: Ubuntu 24.04 bases already hold
# uid 1000 ("ubuntu"); under pyxis/enroot the job runs as the submitting user anyway.
RUN useradd --create-home "${GAD_USER}" && mkdir -p /opt/gad-megatron/runs && chown -R "${GAD_USER}" /opt/gad-megatron
USER ${GAD_USER}

# Smoke test: the pre-flight checks on whatever GPUs the container sees (gad-doctor exits 1 on any FAIL).
CMD ["gad-doctor", "--demo"]
