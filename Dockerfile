# GPU image: megatron-core + Transformer Engine (FP8) + apex + vLLM on NGC PyTorch.
# Build: docker build -t gad-megatron .     Run: docker run --gpus all --ipc=host -it gad-megatron
# NGC 25.xx images ship CUDA, cuDNN, NCCL, PyTorch and Transformer Engine already; we pin the rest.
ARG BASE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE}

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/gad-megatron

# apex is optional (fused Adam / norms); built from source because it has no wheel on PyPI.
ARG WITH_APEX=1
RUN if [ "$WITH_APEX" = "1" ] && ! python -c "import apex" 2>/dev/null; then \
      git clone --depth 1 https://github.com/NVIDIA/apex /tmp/apex && \
      cd /tmp/apex && MAX_JOBS=8 pip install -v --no-build-isolation \
        --config-settings "--build-option=--cpp_ext" --config-settings "--build-option=--cuda_ext" . && \
      rm -rf /tmp/apex; fi

COPY setup.py README.md ./
COPY gad_megatron ./gad_megatron
# Keep the image's own torch and Transformer Engine: install the package and the GPU vLLM without
# letting pip replace them.
RUN pip install "megatron-core>=0.16.1,<0.20" psutil && \
    pip install -e ".[test,vllm-gpu]" && \
    python -c "import megatron.core, transformer_engine, gad_megatron; print('ok')"

COPY tools ./tools
COPY examples ./examples
COPY benchmarks ./benchmarks
COPY tests ./tests
