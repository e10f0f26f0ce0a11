"""The copy baseline of benchmarks/conversion.py: a plain directory copy of the same files."""

import shutil
import sys

if __name__ == "__main__":
    shutil.copytree(sys.argv[1], sys.argv[2])
