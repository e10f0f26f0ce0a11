"""``gad-doctor``: pre-flight checks of a run's allocation, before hours of compute are spent on it.

It takes the run's own config and overrides (``--config``, ``--demo``, dotted keys, as ``gad-train``) and starts
``parallel.nproc`` ranks the same way (torchrun locally, one task per GPU under srun). Every rank runs every check;
rank 0 prints one table (PASS / WARN / FAIL / SKIP, with the numbers and the worst rank's message), writes
``<log.run_dir>/doctor.json`` and the command exits 1 on any FAIL. GPU-only checks say "skipped: no GPU" on CPU.
"""
