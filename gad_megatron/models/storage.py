"""Bytes a run writes: one checkpoint (G and D with their Adam state) and the HF export. The planner turns them
into the Slurm signal lead and the disk a run needs; the trainer refuses to start on a run directory with less
free space than that (before any model is built)."""

from __future__ import annotations

from gad_megatron.models.params import total_params
from gad_megatron.models.roles import D_ROLE

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
HF_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # our dtype names -> HF / torch / vLLM names


def bytes_per_param(dtype: str) -> int:
    """What one trained parameter costs in a checkpoint: the weight, Adam's two fp32 moments and, when training in
    bf16 / fp16, megatron's fp32 master copy."""
    return DTYPE_BYTES[dtype] + 8 + (4 if dtype != "fp32" else 0)


def checkpoint_bytes(arch, dtype: str, with_discriminator: bool = True) -> int:
    """One checkpoint of the run: G (and D, in a GAD run) with their optimizer state. The reference is the
    starting student, read again on resume, never written."""
    params = total_params(arch, "student") + (total_params(arch, D_ROLE) if with_discriminator else 0)
    return params * bytes_per_param(dtype)


def export_bytes(arch, dtype: str) -> int:
    """The end-of-run HF export (``hf_student``): the student's weights in the training dtype."""
    return total_params(arch, "student") * DTYPE_BYTES[dtype]


def disk_need_bytes(arch, dtype: str, keep_last: int, export_hf: bool, with_discriminator: bool = True) -> int:
    """The run directory's peak: ``keep_last`` checkpoints plus the one being written (pruning happens after a
    save completes), plus the export."""
    need = (max(keep_last, 1) + 1) * checkpoint_bytes(arch, dtype, with_discriminator)
    return need + (export_bytes(arch, dtype) if export_hf else 0)
