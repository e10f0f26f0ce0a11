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
import sys


def _parser():
    p = argparse.ArgumentParser(prog="gad-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see examples/configs/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--demo", action="store_true",
                   help="the tiny CPU demo: packaged config + teacher data, student made on the fly")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    return p


def _prepare_demo() -> str:
    import os

    from gad_megatron.data import demo

    os.environ.setdefault("GAD_DEMO_DATA", demo.ASSET)
    if "WORLD_SIZE" not in os.environ:  # made once, by the launching process
        demo.make_student(os.path.join(os.environ.get("GAD_DEMO_DIR", os.path.join("runs", "demo")), "student"))
    return os.path.join(os.path.dirname(demo.ASSET), "demo.yaml")


def _print_demo_result() -> None:
    """The line of docs/results.md that says how GAD compared with SeqKD continued on the demo task."""
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs", "results.md")
    if os.path.isfile(path):
        line = next((ln.strip() for ln in open(path, encoding="utf-8") if ln.startswith("**Verdict")), None)
        if line:
            print(f"{line}  (docs/results.md)")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    from gad_megatron.data.teacher import DataError
    from gad_megatron.trainer.config import ConfigError, load_config, to_yaml

    try:
        config = args.config
        if args.demo:
            config = config or _prepare_demo()
        cfg = load_config(config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        from gad_megatron.trainer.build import load_data, plan_steps

        # Data rows are checked here too, in the launching process, before any rank starts.
        data = load_data(cfg)
        plan_steps(cfg, len(data.train))
    except (ConfigError, DataError, FileNotFoundError, ValueError, OSError) as e:
        print(f"gad-train: error: {e}", file=sys.stderr)
        return 2
    from gad_megatron.runtime.launch import relaunch, under_launcher

    if cfg.parallel.nproc > 1 and not under_launcher():
        rc = relaunch("gad_megatron.trainer.cli", argv, cfg.parallel.nproc)
        if args.demo and rc == 0:
            _print_demo_result()
        return rc
    if under_launcher():
        from gad_megatron.runtime.launch import die_with_parent

        die_with_parent()  # a rank never outlives its launcher (torchrun / srun's step daemon)
    from gad_megatron.trainer.run import train

    train(cfg, data)  # a rank started by torchrun / srun uses the data it just checked: tokenised once
    from gad_megatron.runtime import destroy

    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
