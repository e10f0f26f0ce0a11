"""gad-eval: the paper's LLM-judge protocol (judge reference answer, then scores; student/(student+ref)x100)."""
