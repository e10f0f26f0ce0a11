"""Helper processes and the stop signals. Ctrl-C (SIGINT) and Slurm's ``--signal=USR1@T`` reach every process
of the group / step, but only the trainer decides how to stop (finish the step, save, exit): a helper it started
(megatron's checkpoint-writer queue, vLLM's engine core and workers) must not die of the signal's default action
first. An ignored disposition survives fork and exec, so helpers started inside :func:`ignored_by_children` keep
ignoring it for good; this process gets its own handlers back. While inside, this process ignores the signal
too: use it only where a signal could not be acted on anyway (before the trainer installs its handler), or let
the helper ignore it itself (an initializer)."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def ignored_by_children(*signals):
    if threading.current_thread() is not threading.main_thread():  # signal.signal works on the main thread only
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
