"""Scorers the training tests hand to ``reward.scorer`` (the trainer imports them as ``scorers:<name>``)."""

from gad_megatron.data import demo


def negated(messages, response):
    """The demo scorer with its sign flipped: GRPO on it is GRPO with every advantage's sign flipped."""
    return -demo.score(messages, response)


def nan_on_count(messages, response):
    """NaN on every 'count:' prompt (#24 item 16)."""
    return float("nan") if messages[-1]["content"].startswith("count:") else demo.score(messages, response)


def none_on_count(messages, response):
    """None on every 'count:' prompt (#24 item 15)."""
    return None if messages[-1]["content"].startswith("count:") else demo.score(messages, response)


def raises_on_count(messages, response):
    """Raises on every 'count:' prompt (#24 item 15)."""
    if messages[-1]["content"].startswith("count:"):
        raise KeyError("no rule for count")
    return demo.score(messages, response)


def slow_on_count(messages, response):
    """Hangs for a minute on 'count:' prompts, after touching $GAD_TEST_MARKER (#24 item 22)."""
    import os
    import time

    if messages[-1]["content"].startswith("count:"):
        open(os.environ["GAD_TEST_MARKER"], "w").close()
        time.sleep(60)
    return demo.score(messages, response)
