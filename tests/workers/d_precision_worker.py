"""The discriminator's scores of one batch in an fp32 and a bf16 model (same weights, same fresh head).
argv: hf_dir out.json"""

import json
import sys

import torch


def main():
    from gad_megatron.convert.api import load_from_hf
    from gad_megatron.models import ModelOptions
    from gad_megatron.models.forward import discriminator_scores
    from gad_megatron.runtime import ParallelConfig, destroy, initialize

    hf, out = sys.argv[1], sys.argv[2]
    initialize(ParallelConfig(device="cpu"))
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(5, 90, (8, 20), generator=g)
    batch = {"tokens": tokens, "attention_mask": torch.ones_like(tokens)}
    res = {}
    for dtype in ("fp32", "bf16"):
        torch.manual_seed(17)  # the same fresh head in both
        _, chunks = load_from_hf(hf, "discriminator", ModelOptions(dtype=dtype, transformer_impl="local"))
        s = discriminator_scores(chunks, [batch])[0]
        res[dtype] = s.double().tolist()
        res[f"{dtype}_score_dtype"] = str(s.dtype)
        res[f"{dtype}_head_dtype"] = str(chunks[-1].output_layer.weight.dtype)
    with open(out, "w") as f:
        json.dump(res, f)
    destroy()


if __name__ == "__main__":
    main()
