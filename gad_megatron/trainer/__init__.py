"""Training: ``run.py`` (the loop) drives ``gad.py`` (the stages: warmup, gad, seqkd) over a ``build.Trainer``
(G, the reward in ``rewards.py``, the reference, the rollout engine); ``passes.py`` (generate / forward /
update / sync), ``steps.py`` (the per-micro-batch losses megatron's schedules run), ``engine.py`` (megatron DDP +
optimizer + scheduler), ``batching.py``, ``heldout.py``, ``metrics.py``, ``checkpoint.py`` (save / resume),
``config.py`` and ``cli.py`` (``gad-train``)."""
