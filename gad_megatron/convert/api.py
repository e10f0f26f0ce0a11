"""HF <-> megatron-core conversion: the functions behind ``gad-convert``.

``hf_to_mcore`` runs on every rank of a TP*PP group (the CLI launches them); ``mcore_to_hf`` streams a
checkpoint of any layout to HF safetensors in one process, holding one layer's tensors plus one output shard.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from gad_megatron.convert.hf_io import StreamingSafetensorsWriter
from gad_megatron.convert.lazy_save import ChunkMaker, lazy_strategy
from gad_megatron.convert.megatron_ckpt import (
    TRACKER,
    CheckpointTensorReader,
    copy_hf_side_files,
    hf_config_dir,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from gad_megatron.convert.model_io import HFWeightSource, load_hf_into_model
from gad_megatron.models.discriminator import build_discriminator_chunks
from gad_megatron.models.forward import discriminator_scores, full_logits
from gad_megatron.models.gpt import ModelOptions, build_gpt_chunks
from gad_megatron.models.hf_config import arch_spec_from_dir, arch_spec_from_hf, load_hf_config
from gad_megatron.models.mapping import dims, expected_hf_tensors, mapping_for, to_hf
from gad_megatron.models.roles import D_ROLE
from gad_megatron.models.storage import HF_DTYPE
from gad_megatron.runtime.outputs import check_not_an_input, clean_stale_tmp, make_tmp_dir, publish_dir

ROLES = ("student", D_ROLE)
_HF_DTYPES = {hf: ours for ours, hf in HF_DTYPE.items()}


def hf_dtype(cfg: dict) -> str:
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if name not in _HF_DTYPES:
        raise ValueError(f"config.json: unsupported dtype {name!r} (use one of {sorted(_HF_DTYPES)})")
    return _HF_DTYPES[name]


def build_role_chunks(arch, role: str, opts: Optional[ModelOptions] = None, head_init: str = "normal"):
    if role == "student":
        return build_gpt_chunks(arch, opts)
    if role == D_ROLE:
        return build_discriminator_chunks(arch, opts, head_init=head_init)
    raise ValueError(f"role={role!r}: use one of {ROLES}")


def check_hf_input(hf_dir: str, role: str = "student"):
    """Everything that can be wrong with the HF input, raised once, before any process group or compute."""
    arch = arch_spec_from_dir(hf_dir)
    hf_dtype(arch.hf_config)
    src = HFWeightSource(hf_dir, mapping_for(arch.model_type), arch, role)
    src.validate()
    return arch, src


def hf_to_mcore(hf_dir: str, out: str, role: str = "student", overwrite: bool = False, head_init: str = "normal"):
    """Collective over the already-initialised parallel state: megatron's save (atomic) of the model built on
    the meta device, each rank's chunks read from the HF files as they are written (``convert/lazy_save.py``)."""
    arch, src = check_hf_input(hf_dir, role)
    opts = ModelOptions(dtype=hf_dtype(arch.hf_config), transformer_impl="local", perform_initialization=False)
    # The model is only the plan of the checkpoint (keys, shapes, this rank's TP/PP chunks): built on the meta
    # device, its tensors are made from the HF files chunk by chunk as megatron's save writes them.
    with torch.device("meta"):
        chunks = build_role_chunks(arch, role, opts, head_init=head_init)
    fresh = {}
    if role == D_ROLE and not src.has_head():  # a discriminator from a causal LM: a new scalar head
        fresh["output_layer.weight"] = new_head(arch, head_init)
    maker = ChunkMaker(src, fresh)
    meta = {"role": role, "model_type": arch.model_type, "source": os.path.abspath(hf_dir), "dtype": opts.dtype}
    return save_checkpoint(chunks, out, hf_dir, meta, overwrite=overwrite, strategy=lazy_strategy(maker))


def new_head(arch, head_init: str, seed: int = 1234) -> torch.Tensor:
    """The whole (1 x hidden) scalar head of a new discriminator, the same on every rank (each writes its TP
    chunk): N(0, init_method_std^2) like megatron's linear init, or zeros."""
    if head_init == "zero":
        return torch.zeros(1, arch.hidden_size)
    return torch.empty(1, arch.hidden_size).normal_(0, arch.init_method_std, generator=torch.Generator().manual_seed(seed))


def load_from_checkpoint(ckpt: str, opts: Optional[ModelOptions] = None, role: Optional[str] = None,
                         head_init: str = "normal"):
    """Collective: builds the model recorded in ``ckpt`` at the current parallel layout and loads it.

    ``role`` may differ from the checkpoint's only as student -> discriminator (a discriminator made from a
    student checkpoint: the backbone is loaded, the scalar head starts fresh)."""
    meta = read_meta(ckpt)
    arch = arch_spec_from_dir(hf_config_dir(ckpt))
    role = role or meta["role"]
    if role != meta["role"] and not (meta["role"] == "student" and role == D_ROLE):
        raise ValueError(f"{ckpt}: a {meta['role']} checkpoint cannot be loaded as a {role}")
    # transformer_impl auto: the TE spec on GPU when installed (the checkpoint keys are the same).
    opts = opts or ModelOptions(dtype=meta.get("dtype", "fp32"), perform_initialization=False)
    chunks = build_role_chunks(arch, role, opts, head_init=head_init)
    fresh_head = role != meta["role"]
    load_checkpoint(chunks, ckpt, skip_keys=("output_layer.weight",) if fresh_head else ())
    return arch, chunks, {**meta, "role": role}


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, TRACKER))


def model_hf_dir(path: str) -> str:
    """The HF folder of a model path: the folder itself, or a gad-convert checkpoint's config / tokenizer folder."""
    return hf_config_dir(path) if is_checkpoint(path) else path


def config_dir(path: str) -> str:
    """Where a model's config.json (and tokenizer) live: the HF directory itself, or a checkpoint's ``hf/``."""
    return hf_config_dir(path) if is_checkpoint(path) else path


def load_from_hf(hf_dir: str, role: str = "student", opts: Optional[ModelOptions] = None, head_init: str = "normal"):
    """Collective: builds the model for ``role`` from an HF directory (converted in memory through the
    architecture's mapping; each rank reads its own slices). A discriminator from a causal LM keeps a fresh
    scalar head."""
    arch, src = check_hf_input(hf_dir, role)
    opts = opts or ModelOptions(dtype=hf_dtype(arch.hf_config))
    opts = dataclasses.replace(opts, perform_initialization=False)  # every weight is about to be overwritten
    chunks = build_role_chunks(arch, role, opts, head_init=head_init)
    load_hf_into_model(chunks, src)
    return arch, chunks


def load_model(path: str, role: str = "student", opts: Optional[ModelOptions] = None, head_init: str = "normal"):
    """One loading call for the trainer: ``path`` is an HF directory or a gad-convert checkpoint.
    Returns (arch, chunks, hf_dir) where hf_dir holds the config and tokenizer files."""
    if is_checkpoint(path):
        if opts is not None:
            opts = dataclasses.replace(opts, perform_initialization=False)
        arch, chunks, _ = load_from_checkpoint(path, opts, role=role, head_init=head_init)
        return arch, chunks, config_dir(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: neither an HF model directory (config.json) nor a gad-convert checkpoint "
                                f"(latest_checkpointed_iteration.txt)")
    arch, chunks = load_from_hf(path, role, opts, head_init)
    return arch, chunks, path


def export_hf_config(arch, role: str) -> dict:
    mapping = mapping_for(arch.model_type)
    cfg = dict(arch.hf_config)
    if role == D_ROLE:
        cfg.update(
            architectures=[mapping.seq_cls_class],
            num_labels=1,
            id2label={"0": "LABEL_0"},
            label2id={"LABEL_0": 0},
            tie_word_embeddings=False,
        )
        # HF sequence classifiers find the last real token through pad_token_id.
        if cfg.get("pad_token_id") is None:
            eos = cfg.get("eos_token_id")
            cfg["pad_token_id"] = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)
    else:
        cfg["architectures"] = [mapping.causal_lm_class]
    return cfg


def _mcore_shape(rule, arch) -> tuple:
    """The full checkpoint shape of ``rule``'s megatron tensor implied by the config (layers stacked first)."""
    d = dims(arch)
    shapes = [tuple(d[x] for x in s) for s in rule.hf_shapes]
    shape = shapes[0] if rule.kind == "copy" else (sum(s[0] for s in shapes),) + shapes[0][1:]
    return ((arch.num_layers,) if rule.per_layer else ()) + shape


def check_config_against_checkpoint(ckpt: str, reader: Optional[CheckpointTensorReader] = None):
    """The checkpoint's ``hf/config.json`` must describe the tensors actually stored (an edited layer count
    would otherwise export a truncated model). Returns (arch, role, reader)."""
    meta = read_meta(ckpt)
    src_cfg_dir = hf_config_dir(ckpt)
    cfg_path = os.path.join(src_cfg_dir, "config.json")
    arch = arch_spec_from_hf(load_hf_config(src_cfg_dir), source=cfg_path)
    reader = reader or CheckpointTensorReader(ckpt)
    for rule in mapping_for(arch.model_type).active_rules(arch.tie_word_embeddings, meta["role"]):
        want = _mcore_shape(rule, arch)
        got = reader.shape(rule.mcore) if rule.mcore in reader.meta else None
        if got != want:
            stored = f"stored as {list(got)}" if got is not None else "absent"
            raise ValueError(f"{cfg_path} does not match the checkpoint {reader.dir}: tensor {rule.mcore} is {stored}, "
                             f"the config implies {list(want)} (num_hidden_layers={arch.num_layers}, "
                             f"hidden_size={arch.hidden_size}, vocab_size={arch.vocab_size})")
    return arch, meta["role"], reader


def check_same_model(hf_dir: str, ckpt: str) -> tuple:
    """``verify`` compares like with like: the checkpoint's config must describe its tensors, and the HF model's
    tensors must have the checkpoint's names and shapes. Returns the checkpoint's (arch, role)."""
    ck_arch, role, _ = check_config_against_checkpoint(ckpt)
    hf_arch, _ = check_hf_input(hf_dir, role)
    want = expected_hf_tensors(mapping_for(ck_arch.model_type), ck_arch, role)
    have = expected_hf_tensors(mapping_for(hf_arch.model_type), hf_arch, role)
    for name in sorted(set(want) | set(have)):
        if want.get(name) != have.get(name):
            raise ValueError(f"{hf_dir} is not the model in {ckpt}: {name} is {have.get(name)} there, "
                             f"{want.get(name)} in the checkpoint")
    return ck_arch, role


def mcore_to_hf(ckpt: str, out: str, overwrite: bool = False, max_shard_bytes: int = 5 * 1024**3) -> list:
    """Streams ``ckpt`` to an HF directory (written to a temp dir, renamed at the end). One process; holds
    one layer's tensors at a time, and writes each output tensor straight to its shard file."""
    out = os.path.abspath(out)
    arch, role, reader = check_config_against_checkpoint(ckpt)
    check_not_an_input(out, {"--ckpt": ckpt})
    src_cfg_dir = hf_config_dir(ckpt)
    mapping = mapping_for(arch.model_type)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    rules = mapping.active_rules(arch.tie_word_embeddings, role)
    clean_stale_tmp(out)
    tmp = make_tmp_dir(out)
    writer = None
    try:
        groups = [[(r, None) for r in rules if not r.per_layer]]
        groups += [[(r, i) for r in rules if r.per_layer] for i in range(arch.num_layers)]
        d = dims(arch)
        plan = [
            (name, tuple(d[x] for x in shape), reader.dtype(r.mcore))
            for group in groups
            for r, i in group
            for name, shape in zip(r.hf_names(i), r.hf_shapes)
        ]
        writer = StreamingSafetensorsWriter(tmp, plan, max_shard_bytes)
        # One read per layer, the next one read on a thread while this one is converted and handed to the
        # writer's thread: memory is two layers' tensors plus at most the largest tensor waiting to be written.
        with ThreadPoolExecutor(1, thread_name_prefix="checkpoint-reader") as pool:
            ahead = pool.submit(reader.read, [(r.mcore, i) for r, i in groups[0]])
            for k, group in enumerate(groups):
                got = ahead.result()
                if k + 1 < len(groups):
                    ahead = pool.submit(reader.read, [(r.mcore, i) for r, i in groups[k + 1]])
                for r, i in group:
                    for name, t in zip(r.hf_names(i), to_hf(r, got[(r.mcore, i)], arch)):
                        writer.add(name, t)
                del got
        files = writer.close()
        copy_hf_side_files(src_cfg_dir, tmp, config=export_hf_config(arch, role))
        publish_dir(tmp, out, overwrite)
    except BaseException:
        if writer is not None:
            writer.abort()  # its thread stops before the temp dir goes
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def reference_model(hf_dir: str, role: str):
    """The HF transformers model a converted checkpoint must agree with (eager attention, fp32)."""
    import transformers

    auto = transformers.AutoModelForSequenceClassification if role == D_ROLE else transformers.AutoModelForCausalLM
    return auto.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()


def verify(hf_dir: str, ckpt: str, batch: int = 2, seq_len: int = 32, seed: int = 0) -> Optional[dict]:
    """Collective: runs the checkpoint (current layout) and HF on the same tokens; returns the diff on the
    rank that holds the output (last pipeline stage, TP rank 0), None elsewhere."""
    from megatron.core import parallel_state as ps

    arch, chunks, meta = load_from_checkpoint(
        ckpt, ModelOptions(dtype="fp32", transformer_impl="local", perform_initialization=False)
    )
    for c in chunks:
        c.eval()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, arch.vocab_size, (batch, seq_len), generator=g)
    role = meta["role"]
    pad = arch.hf_config.get("pad_token_id")
    if role == D_ROLE and pad is not None:
        # HF sequence classifiers score the last token that is not pad_token_id: keep pad out of the input.
        tokens[tokens == pad] = (pad + 1) % arch.vocab_size
    mb = {"tokens": tokens, "attention_mask": torch.ones_like(tokens)}
    ours = (discriminator_scores if role == D_ROLE else full_logits)(chunks, [mb])
    if ours is None or ps.get_tensor_model_parallel_rank() != 0:
        return None
    ref_model = reference_model(hf_dir, role)
    with torch.no_grad():
        ref = ref_model(tokens).logits
    ref = ref[:, 0] if role == D_ROLE else ref
    diff = (ours[0].float().cpu() - ref.float()).abs()
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(), "role": role, "shape": list(ref.shape)}
