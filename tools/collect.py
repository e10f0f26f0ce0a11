#!/usr/bin/env python
"""Thin wrapper: ``python tools/collect.py ...`` == ``gad-collect ...`` (gad_megatron/data/collect.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gad_megatron.data.collect import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
