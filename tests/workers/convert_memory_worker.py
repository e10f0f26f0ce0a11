"""hf-to-mcore's own peak memory (#8): the resident-set growth from just before the conversion to its peak.
argv: hf_dir out_ckpt result.json (one rank)"""

import json
import sys


def rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def main():
    from gad_megatron.convert import api
    from gad_megatron.runtime import ParallelConfig, initialize

    hf, out, res = sys.argv[1:4]
    initialize(ParallelConfig(device="cpu"))
    api.check_hf_input(hf)  # imports and header reads done before the baseline
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak) to the current resident set
    before = rss_kb("VmRSS")
    api.hf_to_mcore(hf, out)
    with open(res, "w") as f:
        json.dump({"before_kb": before, "peak_kb": rss_kb("VmHWM")}, f)


if __name__ == "__main__":
    main()
    from gad_megatron.runtime import destroy

    destroy()
