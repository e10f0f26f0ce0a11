"""gad-megatron: Generative Adversarial Distillation (arXiv 2511.10643) on megatron-core."""

__version__ = "0.1.0"
