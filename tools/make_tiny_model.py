#!/usr/bin/env python
"""Makes a tiny random HF model of a supported architecture locally (nothing is downloaded).

    python tools/make_tiny_model.py --arch qwen2_tied --out /tmp/tiny-qwen2
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from hf_fixtures import ARCHS, make_hf_model  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--arch", choices=sorted(ARCHS), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-cls", action="store_true", help="make a *ForSequenceClassification (num_labels=1)")
    a = p.parse_args()
    print(make_hf_model(a.arch, a.out, seed=a.seed, seq_cls=a.seq_cls))
