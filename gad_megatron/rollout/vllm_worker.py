"""vLLM worker extension (``LLM(worker_extension_cls=...)``): in-place weight reload through
``model_runner.reload_weights``, the path that works on CPU too (``model.load_weights`` does not: oneDNN
repacks linear weights). Runs inside vLLM's worker process; keep its imports light."""

from __future__ import annotations


def _retie_embeddings(model_runner) -> bool:
    """vLLM ties ``lm_head.weight`` to the embedding's Parameter object; the in-place reload gives the embedding
    a new Parameter, leaving the head on the old weights (and, on CPU, its packed GEMM handle). Re-tie it and
    redo the head's post-load processing. Returns True when it re-tied."""
    model = model_runner.get_model()
    lm_head = getattr(model, "lm_head", None)
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    cfg = getattr(model_runner, "model_config", None)
    tied = bool(getattr(getattr(cfg, "hf_config", None), "tie_word_embeddings", False))
    if not (tied and lm_head is not None and embed is not None and hasattr(lm_head, "tie_weights")):
        return False
    if lm_head.weight is not embed.weight:
        lm_head.tie_weights(embed)
    lm_head.quant_method.process_weights_after_loading(lm_head)
    return True


class WeightSyncExtension:
    def gad_reload_from_buckets(self, buckets) -> int:
        """In-process engine: ``buckets`` is an iterable of [(hf name, tensor)] lists, consumed lazily."""
        count = [0]

        def named():
            for bucket in buckets:
                for name, tensor in bucket:
                    count[0] += 1
                    yield name, tensor

        self.model_runner.reload_weights(weights_iterator=named())
        _retie_embeddings(self.model_runner)
        return count[0]

    def gad_reload_from_files(self, files) -> int:
        """Separate engine process: each bucket arrives as a safetensors file (e.g. under /dev/shm)."""
        from safetensors import safe_open

        count = [0]

        def named():
            for path in files:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        count[0] += 1
                        yield name, f.get_tensor(name)

        self.model_runner.reload_weights(weights_iterator=named())
        _retie_embeddings(self.model_runner)
        return count[0]
