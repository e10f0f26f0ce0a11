"""The rollout interface shared by every engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Protocol, Sequence


@dataclass
class SamplingConfig:
    """Mirrors vLLM's SamplingParams for what GAD uses (paper: n=8, temperature 0.8, 1536 new tokens)."""

    n: int = 8
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 1536
    stop_token_ids: list = field(default_factory=list)
    seed: Optional[int] = None

    def greedy(self, max_tokens: Optional[int] = None) -> "SamplingConfig":
        return SamplingConfig(n=1, temperature=0.0, max_tokens=max_tokens or self.max_tokens,
                              stop_token_ids=list(self.stop_token_ids), seed=self.seed)


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


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list:
        """Token-id prompts -> ``[[Sample] * n] * len(prompts)``, grouped by prompt, in prompt order."""

    def score(self, sequences: Sequence[Sequence[int]]) -> list:
        """log p(token_t | tokens_<t) for t = 1..len-1 of each sequence (a ``[len-1]`` tensor each)."""

    def update_weights(self, buckets: Iterable) -> None:
        """Loads ``[(hf_name, tensor), ...]`` buckets (HF names and layouts) into the engine's model, as one
        in-place reload."""

