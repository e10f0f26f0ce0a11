"""``reward.source`` -> its :class:`~gad_megatron.trainer.rewards.Reward` class: a registered name, or a user's own
class as ``package.module:Class`` / ``path/to/file.py:Class`` (no edit here needed). Everything that depends on
the reward (what is built, checked before the build, budgeted by the planner) asks the class, never the name.

The registry is its own module so that the rewards' modules never name each other (``rewards`` is imported by
``opd``; a registry in ``rewards`` naming ``opd`` would close a circle).
"""

from __future__ import annotations

import importlib

from gad_megatron.trainer.rewards import Reward, RewardContext, load_scorer

# reward.source -> "module:Class" (imported when chosen). A new built-in reward is one class and a line here.
REWARDS = {
    "discriminator": "gad_megatron.trainer.rewards:DiscriminatorReward",
    "scorer": "gad_megatron.trainer.rewards:ScorerReward",
    "mixed": "gad_megatron.trainer.rewards:MixedReward",
    "opd": "gad_megatron.trainer.opd:OPDReward",
    "gad+opd": "gad_megatron.trainer.opd:GadOpdReward",
}
DEFAULT_REWARD = "discriminator"  # GAD's: D trained by Bradley-Terry


def reward_choices() -> tuple:
    return tuple(REWARDS)


def reward_class(source: str) -> type:
    """The class ``source`` names. Raises ValueError (naming the choices) for an unknown name or a spec that
    does not load a Reward subclass."""
    if source in REWARDS:
        module, cls = REWARDS[source].split(":")
        return getattr(importlib.import_module(module), cls)
    if not isinstance(source, str) or ":" not in source:
        raise ValueError(f"use one of {', '.join(REWARDS)} or a module:Class / file.py:Class of your own")
    try:
        found = load_scorer(source)
    except Exception as e:  # noqa: BLE001  (whatever the user's module raises on import: one line)
        raise ValueError(f"cannot be imported ({type(e).__name__}: {e})") from None
    if not (isinstance(found, type) and issubclass(found, Reward)):
        raise ValueError(f"is a {type(found).__name__}, not a subclass of gad_megatron.trainer.rewards.Reward")
    return found


def make_reward(ctx: RewardContext) -> Reward:
    """The reward ``reward.source`` names."""
    return reward_class(ctx.cfg.reward.source).build(ctx)
