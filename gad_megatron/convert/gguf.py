"""``gad-convert gguf-to-hf``: a GGUF file (llama.cpp's format) -> an HF folder the rest of the project reads.

transformers does the reading and dequantising (``from_pretrained(dir, gguf_file=...)``, extra ``[gguf]``:
``gguf`` + ``accelerate``); what is ours is the checking before anything is written and the atomic output:

- the file must be a GGUF whose architecture transformers reads *and* whose HF ``model_type`` is a family we
  map (``models/families``); every tensor's quantisation must be one ``gguf`` can dequantise; the config must
  pass the same architecture checks as an HF folder (:func:`arch_spec_from_hf`). Each failure is one line
  naming the file and what is wrong, before any weight is read.
- the output (fp32 safetensors, config, tokenizer files with the chat template, generation config) is written
  to ``<out>.tmp-*`` and renamed into place when whole; a crash leaves no half folder under ``out``.

The GGUF quantizer transformers attaches to the model is dropped before saving: the weights are already
dequantised, and ``save_pretrained`` refuses a model that still claims to be GGUF-quantised.
"""

from __future__ import annotations

import os
import re
import shutil

from gad_megatron.models.hf_config import UnsupportedConfigError, arch_spec_from_hf
from gad_megatron.models.mapping import supported_model_types
from gad_megatron.runtime.outputs import clean_stale_tmp, make_tmp_dir, publish_dir


class GGUFError(ValueError):
    """A GGUF file this converter cannot turn into an HF folder; the message names the file."""


def _imports():
    try:
        import gguf  # noqa: F401
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise GGUFError(f"gguf-to-hf needs the 'gguf' and 'accelerate' packages (pip install "
                        f"'gad-megatron[gguf]'): {e}") from None
    # transformers' notes on what a GGUF lacks and its per-tensor progress bars are noise here: our checks
    # say what matters in one line.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return load_gguf_checkpoint


def _tensors(path: str) -> list:
    """gguf-py's tensor records of ``path``; a file cut short or damaged is one GGUFError saying so (gguf-py's
    own message is numpy's "cannot reshape array of size 560 into shape (576,)")."""
    from gguf import GGUFReader

    size = os.path.getsize(path)
    try:
        tensors = GGUFReader(path).tensors
    except Exception as e:  # noqa: BLE001  (whatever a damaged file makes the reader raise)
        raise GGUFError(f"{path}: truncated or damaged GGUF ({size:,} bytes; its tensors cannot be read: "
                        f"{type(e).__name__})") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in tensors), default=0)
    if end > size:
        raise GGUFError(f"{path}: truncated GGUF: its tensors end at byte {end:,}, the file has {size:,}")
    return tensors


def _quant_problem(path: str, tensors: list) -> str:
    """'' when every tensor's quantisation is one gguf-py dequantises, else a line naming the first that is not."""
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits

    readable = {GGMLQuantizationType.F32, GGMLQuantizationType.F16} | set(_type_traits)
    for t in tensors:
        if t.tensor_type not in readable:
            return (f"{path}: tensor {t.name!r} is quantised as {t.tensor_type.name}, which transformers' GGUF "
                    f"reader cannot dequantise")
    return ""


def _missing_layers(path: str, tensors: list, layers: int) -> str:
    """'' when every one of the ``layers`` blocks has tensors (``blk.<i>.*``); else a line naming the missing
    ones: transformers would fill them with random weights without a word."""
    present = {int(m.group(1)) for t in tensors for m in [re.match(r"blk\.(\d+)\.", t.name)] if m}
    missing = [i for i in range(layers) if i not in present]
    if not missing:
        return ""
    shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
    return (f"{path}: holds no tensors for {len(missing)} of its {layers} layers ({shown}): a partial file; its "
            f"layers would be random weights")


def inspect_gguf(path: str) -> dict:
    """The HF config transformers would build from ``path``'s metadata, after every check; no weight read."""
    load_gguf_checkpoint = _imports()
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: GGUF file not found")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (no GGUF magic at its start)")
    tensors = _tensors(path)
    try:
        parsed = load_gguf_checkpoint(path, return_tensors=False)
    except ValueError as e:  # transformers: "GGUF model with architecture X is not supported yet."
        raise GGUFError(f"{path}: {' '.join(str(e).split())}") from None
    except Exception as e:  # a truncated or corrupt header
        raise GGUFError(f"{path}: unreadable GGUF ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    config = parsed["config"]
    model_type = config.get("model_type")
    if model_type not in supported_model_types():
        raise GGUFError(f"{path}: architecture {model_type!r} is not a family gad-megatron maps "
                        f"(supported: {', '.join(supported_model_types())})")
    problem = _quant_problem(path, tensors) or _missing_layers(path, tensors, int(config.get("num_hidden_layers") or 0))
    if problem:
        raise GGUFError(problem)
    return config


def gguf_to_hf(path: str, out: str, overwrite: bool = False) -> str:
    """Writes the HF folder for GGUF ``path`` at ``out`` (atomically) and returns ``out``."""
    import torch
    import transformers

    config = inspect_gguf(path)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    folder, name = os.path.split(os.path.abspath(path))
    try:  # first: it reads no weights (#32 item 3: merges naming a token not in the vocabulary were a traceback)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # noqa: BLE001  (whatever the tokenizer builder raises on a damaged vocabulary)
        raise GGUFError(f"{path}: its tokenizer cannot be built ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]})") from None
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    for pname, p in model.named_parameters():  # #32 item 4: damaged tensor data (NaN / inf) converted with exit 0
        bad = int((~torch.isfinite(p)).sum())
        if bad:
            raise GGUFError(f"{path}: tensor {pname} holds {bad:,} non-finite values (NaN / inf) after dequantising: "
                            f"a damaged file")
    # dequantised already: without this save_pretrained refuses ("GGUF quantized model ... cannot be saved")
    model.hf_quantizer = None
    for cfg in (model.config, getattr(model.generation_config, "_from_model_config", None) and model.generation_config):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    try:
        arch_spec_from_hf(model.config.to_dict(), source=f"{path} (as config.json)")
    except UnsupportedConfigError as e:
        raise GGUFError(str(e)) from None
    clean_stale_tmp(out)
    tmp = make_tmp_dir(out)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "gguf_source.txt"), "w") as f:
            f.write(f"{os.path.abspath(path)}\nmodel_type {config.get('model_type')}\n")
        publish_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
