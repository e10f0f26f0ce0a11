"""What a Slurm job means for a megatron run: the node list, the rendezvous, every task's rank.

The sbatch scripts in ``examples/`` call ``python -m gad_megatron.runtime.slurm env`` for the
``MASTER_ADDR`` / ``MASTER_PORT`` (and the job's size) they export before ``srun``; inside the step each task
(one per GPU, srun-native) takes ``RANK`` / ``LOCAL_RANK`` from ``SLURM_PROCID`` / ``SLURM_LOCALID``
(``runtime.parallel`` reads both spellings). Pure functions of the environment, so tests run them under a
fake ``SLURM_*`` environment.

    python -m gad_megatron.runtime.slurm env            # export lines for the batch script
    python -m gad_megatron.runtime.slurm task           # this task's rank variables (inside srun)
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import Mapping, Optional


def expand_nodelist(spec: str) -> list:
    """Slurm's compressed host list (``gpu-[001-003,007],login1``) -> host names, in order."""
    hosts, parts, depth, cur = [], [], 0, ""
    for ch in spec:  # split on commas outside brackets
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    for part in parts:
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                a, b = r.split("-")
                for n in range(int(a), int(b) + 1):
                    hosts.extend(f"{prefix}{str(n).zfill(len(a))}{h}" for h in expand_nodelist(suffix) or [""])
            else:
                hosts.extend(f"{prefix}{r}{h}" for h in expand_nodelist(suffix) or [""])
    return hosts


def _gpus_per_node(env: Mapping) -> int:
    # GAD_ALLOC_GPUS_PER_NODE: the job script's own record of the allocation (inside a one-task helper step the
    # SLURM_* GPU variables describe the step, not the job).
    for key in ("GAD_ALLOC_GPUS_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        v = env.get(key)
        if v:
            m = re.search(r"(\d+)(\(x\d+\))?$", v)  # "8", "h100:8", "8(x2)"
            if m:
                return int(m.group(1))
    return 1


@dataclass
class SlurmJob:
    job_id: int
    nodes: list
    gpus_per_node: int
    master_port: int

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def master_addr(self) -> str:
        return self.nodes[0]

    @classmethod
    def from_env(cls, env: Optional[Mapping] = None) -> "SlurmJob":
        env = os.environ if env is None else env
        if "SLURM_JOB_ID" not in env:
            raise RuntimeError("not inside a Slurm job (no SLURM_JOB_ID)")
        nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "localhost")
        # the job's node count, not a helper step's (SLURM_NNODES is the step's inside srun)
        key = next((k for k in ("GAD_ALLOC_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES") if env.get(k)), None)
        n = int(env[key]) if key else len(nodes)
        if n != len(nodes):
            raise RuntimeError(f"{key}={n} but SLURM_JOB_NODELIST names {len(nodes)} node(s)")
        job_id = int(env["SLURM_JOB_ID"])
        # A port from the job id: two jobs sharing a first node do not collide, a requeued job keeps its port.
        port = int(env.get("MASTER_PORT") or 20000 + job_id % 30000)
        return cls(job_id, nodes, _gpus_per_node(env), port)

    def export_lines(self) -> list:
        # Not WORLD_SIZE: each srun step (conversion on fewer tasks, then training) has its own, which the
        # ranks read from SLURM_NTASKS / SLURM_PROCID.
        return [f"export MASTER_ADDR={self.master_addr}", f"export MASTER_PORT={self.master_port}",
                f"export GAD_WORLD_SIZE={self.world_size}", f"export GAD_NUM_NODES={self.num_nodes}",
                f"export GAD_GPUS_PER_NODE={self.gpus_per_node}"]


def task_env(env: Optional[Mapping] = None) -> dict:
    """This srun task's rendezvous variables (what torchrun would have set)."""
    env = os.environ if env is None else env
    job = SlurmJob.from_env(env)
    return {"RANK": int(env["SLURM_PROCID"]), "LOCAL_RANK": int(env.get("SLURM_LOCALID", 0)),
            "WORLD_SIZE": int(env.get("SLURM_NTASKS", job.world_size)), "NODE_RANK": int(env.get("SLURM_NODEID", 0)),
            "MASTER_ADDR": env.get("MASTER_ADDR", job.master_addr), "MASTER_PORT": job.master_port}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else "env"
    try:
        if cmd == "env":
            print("\n".join(SlurmJob.from_env().export_lines()))
        elif cmd == "task":
            print("\n".join(f"export {k}={v}" for k, v in task_env().items()))
        else:
            print(f"usage: python -m gad_megatron.runtime.slurm env|task (got {cmd!r})", file=sys.stderr)
            return 2
    except (RuntimeError, KeyError, ValueError) as e:
        print(f"gad slurm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
