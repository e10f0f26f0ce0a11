"""Lets megatron-core run on CPU over gloo.

megatron-core asks for CUDA unconditionally (``device=torch.cuda.current_device()``, ``.cuda()``,
``zeros(..., device='cuda')``, ``torch.cuda.synchronize()``, a CUDA RNG tracker, ``.type()`` asserts) in ~45
places that move between releases. Rather than patching call sites by line, this module:

* installs a process-wide ``TorchFunctionMode`` that rewrites every CUDA device request to CPU,
* stubs the few ``torch.cuda`` functions megatron calls for bookkeeping (device index, sync, events, streams),
* swaps megatron's CUDA RNG tracker for one that forks the CPU generator,
* answers ``.type()`` (no-argument form) with the CUDA spelling megatron's optimizer asserts on,
* and lets a model's own forward run outside that redirect (:func:`redirect_paused`): there megatron asks for a
  device only through ``torch.cuda.current_device()`` (stubbed to the CPU device) and its two cached mask
  builders (made CPU ones here), and the redirect costs a Python call per torch op (~10 % of a SmolLM2 decode
  step or G update, ``benchmarks/smollm2.py``).

It is imported only by :func:`gad_megatron.runtime.parallel.initialize` when the device is CPU, and must be
applied in every process before a model is built. GPU runs never import it.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_LOCK = threading.Lock()
_MODE = None  # the process's redirect, entered once by apply()


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # megatron passes torch.cuda.current_device() (an int) as device=; on CPU no int device is legitimate.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and kwargs["device"] is not None and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = torch.device("cpu")
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if (i > 0 and _is_cuda_device(a)) else a for i, a in enumerate(args))
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # clip_grads / optimizer assert grad.type() == 'torch.cuda.FloatTensor'.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        return func(*args, **kwargs)


class _FakeEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _FakeStream(_FakeEvent):
    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _FakeEvent()


def _stub(name, result=None):
    # One distinct function per stub: torch._dynamo keys its rule map by function object and rejects one object
    # registered under two torch.cuda names.
    def stub(*args, **kwargs):
        return result() if callable(result) else result

    stub.__name__ = stub.__qualname__ = f"cpu_shim_{name}"
    return stub


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    for name in ("set_device", "synchronize", "empty_cache", "reset_peak_memory_stats", "manual_seed",
                 "manual_seed_all", "set_stream"):
        setattr(cuda, name, _stub(name))
    # current_device() is used as ``device=`` in megatron, also inside autograd Function.backward, where the
    # TorchFunctionMode is not active: answering with the CPU device itself makes those calls correct too.
    cuda.current_device = _stub("current_device", lambda: torch.device("cpu"))
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved",
                 "max_memory_reserved"):
        setattr(cuda, name, _stub(name, 0))
    cuda.device_count = _stub("device_count", 1)
    cuda.Event = _FakeEvent
    cuda.Stream = _FakeStream
    cuda.current_stream = _stub("current_stream", _FakeStream)
    cuda.default_stream = _stub("default_stream", _FakeStream)
    cuda.stream = _stub("stream", contextlib.nullcontext)
    cuda.nvtx.range_push = _stub("range_push")
    cuda.nvtx.range_pop = _stub("range_pop")


def _install_cpu_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Megatron's named RNG streams (data-parallel / model-parallel seeds) on the CPU generator."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    # Activation recomputation (CheckpointFunction) saves and restores the "CUDA" RNG state around the
    # recomputed forward: on CPU that is the CPU generator.
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom.initialize_rng_tracker(force_reset=True)


def _redirect_in_backward() -> None:
    """The autograd engine runs custom Function.backward (megatron's TP mappings, activation recomputation)
    without the process's TorchFunctionMode, so wrap those backward calls in the redirect as well."""
    from torch.autograd import function as autograd_function

    original = autograd_function.BackwardCFunction.apply

    def apply_with_redirect(self, *args):
        with _CudaToCpuMode():
            return original(self, *args)

    autograd_function.BackwardCFunction.apply = apply_with_redirect


def _cpu_mask_builders() -> None:
    """megatron's default causal / sliding-window masks (lru-cached, ``device="cuda"``): the only device requests
    left in a model's forward once ``current_device()`` answers the CPU device. Rebuilt on the CPU here, so the
    forward needs no redirect. fused_softmax imported them by name, so both bindings are replaced."""
    import functools

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    @functools.lru_cache(maxsize=None)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()

    megatrons_sliding = tutils.get_sliding_window_causal_mask

    @functools.lru_cache(maxsize=None)
    def get_sliding_window_causal_mask(sq, skv, window_size):
        with _CudaToCpuMode():  # megatron's own construction, its device request redirected
            return megatrons_sliding(sq, skv, window_size)

    for mod in (tutils, fused_softmax):
        if hasattr(mod, "get_default_causal_mask"):
            mod.get_default_causal_mask = get_default_causal_mask
        if hasattr(mod, "get_sliding_window_causal_mask"):
            mod.get_sliding_window_causal_mask = get_sliding_window_causal_mask


@contextlib.contextmanager
def redirect_paused():
    """A model's forward without the device redirect (see the module's docstring); a nested call finds it
    paused already and leaves it so. A request for a CUDA device inside fails loudly (torch has no CUDA here):
    never a silent wrong device."""
    from torch.overrides import _get_current_function_mode, _pop_mode_temporarily

    if _MODE is None or _get_current_function_mode() is not _MODE:  # not applied, or already paused here
        yield
        return
    with _pop_mode_temporarily():
        yield


def apply() -> None:
    """Idempotent; call before building any megatron model in this process."""
    global _APPLIED, _MODE
    with _LOCK:
        if _APPLIED:
            return
        import megatron.core  # noqa: F401  (imports torch._dynamo before torch.cuda is stubbed)

        _patch_torch_cuda()
        # Entered and never exited: the redirect must cover the whole life of the process.
        _MODE = _CudaToCpuMode()
        _MODE.__enter__()
        _redirect_in_backward()
        _install_cpu_rng_tracker()
        _cpu_mask_builders()
        _APPLIED = True


def is_applied() -> bool:
    return _APPLIED
