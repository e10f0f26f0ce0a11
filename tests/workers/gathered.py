"""The end most workers share: every rank's result gathered, rank 0 writes the list as JSON for the test."""

import json

import torch.distributed as dist


def write_gathered_json(result, path: str) -> None:
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, result)
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(rows, f)
