"""``gad-train``: the GAD trainer entry point."""

import sys


def main(argv=None) -> int:
    print("gad-train: not implemented yet: the GAD trainer (warmup + GAD stages) lands with its own issue.\n"
          "Available today: gad-convert (HF <-> megatron-core checkpoints), see README.md.")
    return 3


if __name__ == "__main__":
    sys.exit(main())
