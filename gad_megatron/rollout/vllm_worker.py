"""vLLM worker extension (``LLM(worker_extension_cls=...)``): in-place weight reload through
``model_runner.reload_weights``, the path that works on CPU too (``model.load_weights`` does not: oneDNN
repacks linear weights). Runs inside vLLM's worker process; keep its imports light."""

from __future__ import annotations


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
        return count[0]
