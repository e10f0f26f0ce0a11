"""One file per architecture; each defines ``MAPPING`` (an ArchMapping). Adding an architecture = adding a file."""
