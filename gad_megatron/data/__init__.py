"""Data: teacher rows and prompts (one JSONL reader, ``jsonl.py``), the OpenAI-compatible chat client and
``gad-collect``, the shipped demo task, and the one place chat templates are applied (``chat.py``)."""
