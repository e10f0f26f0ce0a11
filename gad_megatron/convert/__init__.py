"""HF <-> megatron-core conversion (``gad-convert``), driven by one declarative mapping per architecture."""
