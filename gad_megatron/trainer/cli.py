"""``gad-train``: the GAD trainer (and the SeqKD baseline) on megatron-core.

    gad-train --config run.yaml [dotted.key=value ...]
    gad-train --config run.yaml --print-config
    torchrun --nproc-per-node 8 -m gad_megatron.trainer.cli --config run.yaml     # or srun

The config is checked completely (keys, types, combinations, data rows) before any model is built or any
rank waits on a collective. A plain ``gad-train`` that needs several ranks (``parallel.nproc``) re-launches
itself under ``torch.distributed.run`` and forwards signals to its ranks.
"""

from __future__ import annotations

import argparse
import os
import sys

from gad_megatron.data import demo
from gad_megatron.data.teacher import DataError
from gad_megatron.eval.paired import heldout_change
from gad_megatron.runtime import destroy
from gad_megatron.runtime.launch import LAUNCHER_PID, die_with_parent, relaunch, under_launcher
from gad_megatron.runtime.outputs import lock_directory
from gad_megatron.trainer.checkpoint import CheckpointWriteError
from gad_megatron.trainer.config import ConfigError, load_config, to_yaml, validate
from gad_megatron.trainer.drift import ResumeConfigError
from gad_megatron.trainer.preflight import run_checks
from gad_megatron.trainer.rewards import ScorerError
from gad_megatron.trainer.run import train


def _parser():
    p = argparse.ArgumentParser(prog="gad-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see examples/configs/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--check", action="store_true",
                   help="check the config, the data rows and the model's limits (no model is built), then exit")
    p.add_argument("--demo", action="store_true",
                   help="the tiny CPU demo: packaged config + teacher data, student made on the fly")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    return p


def _prepare_demo() -> str:
    os.environ.setdefault("GAD_DEMO_DATA", demo.ASSET)
    if "WORLD_SIZE" not in os.environ:  # made once, by the launching process
        demo.make_student(os.path.join(os.environ.get("GAD_DEMO_DIR", os.path.join("runs", "demo")), "student"))
    return os.path.join(os.path.dirname(demo.ASSET), "demo.yaml")


def _quiet() -> None:
    """Before megatron / vLLM are imported (here and, through the environment, in every rank and engine
    process): the library noise that is expected on CPU, filtered once."""
    import logging
    import warnings

    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("torch.distributed").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


# The processes we start (ranks, vLLM's engine) inherit these. vLLM's warnings on CPU are expected (no triton,
# eager mode, the in-place reload of tied weights); UserWarning / FutureWarning are the missing TE / apex ones.
_QUIET_ENV = {"VLLM_LOGGING_LEVEL": "ERROR", "TORCH_CPP_LOG_LEVEL": "ERROR",
              "PYTHONWARNINGS": "ignore::UserWarning,ignore::FutureWarning", "TRANSFORMERS_VERBOSITY": "error"}


def _loud() -> None:
    """``log.verbose=true`` set in the YAML after :func:`_quiet` ran: everything again."""
    import warnings

    for key, value in _QUIET_ENV.items():
        if os.environ.get(key) == value:
            del os.environ[key]
    warnings.resetwarnings()


def _print_demo_result(run_dir: str) -> None:
    """One plain line on the run just shown: its held-out score after the SeqKD warmup and after GAD, and the
    change prompt by prompt with its standard error; where GAD is compared with SeqKD over seeds."""
    try:
        parts = [(key, heldout_change(run_dir, "after_warmup", "after", key)) for key in ("sampled", "greedy")]
    except FileNotFoundError:
        return
    said = [f"{key} {c.before:.3f} -> {c.after:.3f} (change {c.change:+.3f} +- {c.se:.3f}, {c.prompts} prompts)"
            for key, c in parts if c is not None]
    if said:
        print("this run, held-out score after the SeqKD warmup -> after GAD: " + "; ".join(said) +
              ". GAD against SeqKD continued for as many steps, over 3 seeds: docs/results.md", flush=True)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)

    try:
        if not any(o.replace(" ", "").lower() == "log.verbose=true" for o in args.overrides):
            _quiet()  # before the demo's student is made and anything noisy is imported
        config = args.config
        if args.demo:
            config = config or _prepare_demo()
        cfg = load_config(config, args.overrides, check_rules=False)  # the rules are the pre-flight's first check
        if cfg.log.verbose:
            _loud()
        if args.print_config:
            validate(cfg)
            print(to_yaml(cfg), end="")
            return 0

        found = run_checks(cfg, keep_going=args.check)  # every refusal before any rank starts or model is built
        if found.refused:  # --check: every refusal, each in its own line, in the pre-flight's order
            for _, message in found.refused:
                print(f"gad-train: error: {message}", file=sys.stderr)
            if found.skipped and len(found.refused) > 1:  # a note under several refusals (one refusal: one line)
                print("  not checked, their input refused: " + ", ".join(f"{c} (needs {n})" for c, n in found.skipped),
                      file=sys.stderr)
            if len(found.refused) > 1:
                print(f"gad-train: --check: {len(found.refused)} refusals, from the "
                      f"{', '.join(c for c, _ in found.refused)} checks", file=sys.stderr)
            return 2
        data, estimate, whole, note = found.data, found.step, found.run, found.run_note
        says = not under_launcher() or (os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"
                                        and LAUNCHER_PID not in os.environ)  # gad-train's launcher, or rank 0 of srun
        if says:
            print(f"gad-train: {estimate.describe(cfg.train.stage)}", file=sys.stderr)
            print(f"gad-train: {whole.describe()}", file=sys.stderr)
            if note:
                print(f"gad-train: {note}", file=sys.stderr)
        st, d = data.stats, cfg.data
        if (st.dropped_prompt_too_long or st.dropped_response_too_long) and says:  # not only in data_stats.json
            print(f"gad-train: {d.train}: {st.dropped_prompt_too_long + st.dropped_response_too_long} training rows "
                  f"dropped ({st.rows} read): {st.dropped_prompt_too_long} with a prompt longer than data.max_prompt_tokens="
                  f"{d.max_prompt_tokens}, {st.dropped_response_too_long} with an answer longer than "
                  f"data.max_response_tokens={d.max_response_tokens} (data.overlong=truncate keeps them, cut)",
                  file=sys.stderr)
        if (st.truncated_prompt or st.truncated_response) and says:
            print(f"gad-train: {d.train}: {st.truncated_prompt} prompts and {st.truncated_response} answers cut to "
                  f"data.max_prompt_tokens / data.max_response_tokens (data.overlong=truncate)", file=sys.stderr)
        if data.stats.duplicate_ids and says:
            print(f"gad-train: {cfg.data.train}: {data.stats.duplicate_ids} rows repeat an id seen before and were "
                  f"dropped (the first row of each id is kept)", file=sys.stderr)
        if not under_launcher() and not args.check:  # the ranks take the lock; this is the early, clear error

            lock_directory(os.path.abspath(cfg.log.run_dir)).close()
        if args.check:
            print(f"gad-train: ok: {len(data.train)} training / {len(data.held)} held-out examples")
            return 0
    except (ConfigError, DataError, FileNotFoundError, ValueError, OSError, RuntimeError) as e:
        print(f"gad-train: error: {e}", file=sys.stderr)
        return 2

    if cfg.parallel.nproc > 1 and not under_launcher():
        rc = relaunch("gad_megatron.trainer.cli", argv, cfg.parallel.nproc)
        if args.demo and rc == 0:
            _print_demo_result(cfg.log.run_dir)
        return rc
    if under_launcher():
        die_with_parent()  # a rank never outlives its launcher (torchrun / srun's step daemon)
    return run_rank(cfg, data)


def run_rank(cfg, data) -> int:
    """This rank's training, and how it ends: each expected failure is one line and its own exit code."""
    try:
        train(cfg, data)  # a rank started by torchrun / srun uses the data it just checked: tokenised once
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print(f"gad-train: interrupted; the last checkpoint in {cfg.log.run_dir}/checkpoints is whole: run the "
                  f"same command to resume from it", file=sys.stderr)
        sys.stdout.flush(), sys.stderr.flush()
        # Now, not at interpreter exit: a checkpoint write cut short leaves threads / helpers the exit would
        # wait for. Every checkpoint is published atomically; the next start removes the partial one.
        os._exit(130)
    except FloatingPointError as e:  # non-finite updates: a training failure with its own one-line reason
        if os.environ.get("RANK", "0") == "0":
            print(f"gad-train: error: {e}", file=sys.stderr)
        return 1
    except ScorerError as e:  # a user's scorer failed on a row: one line naming it and the row
        if os.environ.get("RANK", "0") == "0":
            print(f"gad-train: error: {e}", file=sys.stderr)
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(1)  # not at interpreter exit: the other ranks wait in a collective; the launcher stops them
    except CheckpointWriteError as e:  # the disk filled up while saving: one line, the last checkpoint is whole
        print(f"gad-train: error: {e}", file=sys.stderr)
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(1)  # not at interpreter exit: the failed writer's helpers would be waited for
    except ResumeConfigError as e:  # raised alike on every rank, before any weight is loaded
        if os.environ.get("RANK", "0") == "0":
            print(f"gad-train: error: {e}", file=sys.stderr)
        return 2

    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
