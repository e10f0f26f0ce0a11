#!/usr/bin/env python
"""Thin wrapper: ``python tools/convert.py ...`` == ``gad-convert ...`` (see gad_megatron/convert/cli.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gad_megatron.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
