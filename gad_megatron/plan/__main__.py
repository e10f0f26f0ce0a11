"""``python -m gad_megatron.plan`` == ``gad-plan``."""

import sys

from gad_megatron.plan.cli import main

sys.exit(main())
