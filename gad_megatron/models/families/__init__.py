"""One file per architecture family; each defines ``MAPPING`` (an ArchMapping: weight rules + config quirks).
Adding an architecture = adding a file here."""
