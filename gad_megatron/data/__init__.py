"""Data: prompts and teacher answers, and the one place chat templates are applied."""
