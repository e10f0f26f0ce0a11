"""Scorers the training tests hand to ``reward.scorer`` (the trainer imports them as ``scorers:<name>``)."""

from gad_megatron.data import demo


def negated(messages, response):
    """The demo scorer with its sign flipped: GRPO on it is GRPO with every advantage's sign flipped."""
    return -demo.score(messages, response)
