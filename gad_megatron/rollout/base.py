"""The rollout interface shared by every engine: :class:`RolloutEngine` (what the trainer calls) and the
registry of engines the config's ``rollout.engine`` chooses from."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence


@dataclass
class SamplingConfig:
    """Mirrors vLLM's SamplingParams for what GAD uses (paper: n=8, temperature 0.8, 1536 new tokens)."""

    n: int = 8
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 1536
    stop_token_ids: list = field(default_factory=list)
    seed: Optional[int] = None  # the step's seed; each request's own is runtime.topology.request_seed(seed, index)
    index_base: int = 0  # the global batch index of the first prompt passed (an engine's block of the prompts)

    def greedy(self, max_tokens: Optional[int] = None) -> "SamplingConfig":
        return SamplingConfig(n=1, temperature=0.0, max_tokens=max_tokens or self.max_tokens,
                              stop_token_ids=list(self.stop_token_ids), seed=self.seed, index_base=self.index_base)


@dataclass
class Sample:
    prompt_index: int
    token_ids: list  # generated tokens only
    logprobs: list  # log p(token) under the sampling policy, one per generated token
    finish_reason: str  # "stop" | "length"
    text: str = ""
    cumulative_logprob: Optional[float] = None  # as the engine reports it (vLLM), for cross-checks

    @property
    def sequence_logprob(self) -> float:
        return float(sum(self.logprobs))

    @property
    def truncated(self) -> bool:
        """Cut at max_tokens: the answer has no end (D does not learn from it; GRPO's algo.truncated_reward)."""
        return self.finish_reason == "length"


class RolloutEngine(ABC):
    """What the trainer calls on a rollout engine, and nothing else.

    - ``collective``: every rank calls ``generate`` with the same prompts and gets the same samples (an engine
      on the trainer's own model-parallel megatron GPT); False: global rank 0 alone calls it and the trainer
      broadcasts the samples.
    - ``live_weights``: the engine samples with the trainer's own parameters (nothing to sync); False: a
      separate copy fed by ``weight_sync.WeightSync``, which calls ``update_weights`` and probes ``score``.
    - ``sleep`` / ``wake_up``: hand memory back to training between rollouts (colocated on a GPU);
      ``shutdown``: stop processes the engine started. No-ops unless an engine has them.
    """

    collective: bool = False
    live_weights: bool = False
    distributions: tuple = ()  # the packages it runs on (gad-doctor reports their versions)

    @classmethod
    def unavailable_reason(cls):
        """None when the engine can run here; otherwise why not (``auto`` skips it, tests skip on it)."""
        return None

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list:
        """Token-id prompts -> ``[[Sample] * n] * len(prompts)``, grouped by prompt, in prompt order."""

    def update_weights(self, buckets: Iterable) -> None:
        """Loads ``[(hf_name, tensor), ...]`` buckets (HF names and layouts) into the engine's model, as one
        in-place reload (engines with ``live_weights`` have nothing to load)."""
        raise NotImplementedError(f"{type(self).__name__} samples with the trainer's live weights: nothing to sync")

    def score(self, sequences: Sequence[Sequence[int]]) -> list:
        """log p(token_t | tokens_<t) for t = 1..len-1 of each sequence (a ``[len-1]`` tensor each): the
        weight sync's probe (engines with ``live_weights`` are never probed)."""
        raise NotImplementedError(f"{type(self).__name__} has no scoring probe")

    @classmethod
    def build(cls, inputs: "EngineInputs") -> "RolloutEngine":
        """The engine from what it reads of ``inputs`` (every caller builds engines through
        ``rollout.factory.build_engine``)."""
        raise NotImplementedError(f"{cls.__name__} does not say how it is built")

    def sleep(self) -> None:
        pass

    def wake_up(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


@dataclass
class EngineInputs:
    """What any engine is built from; each class reads its own part. The trainer, gad-eval and gad-doctor fill
    it and call ``rollout.factory.build_engine``: one way to make an engine."""

    chunks: Optional[list] = None  # the trainer's own model chunks (an engine with ``live_weights``)
    max_batch_tokens: int = 1 << 17  # the megatron engine's KV cache holds at most this many tokens a batch
    vllm: object = None  # rollout.vllm_engine.VLLMConfig (a separate copy of the weights)
