"""HF <-> megatron-core conversion (``gad-convert``) and model loading from either form, driven by the per-family
mappings in ``models/families/`` (the same ones the model builder and the weight sync read)."""
