"""Run by the `deepspeed` launcher in test_deepspeed.py: train a few steps from a JSON config."""

import json
import sys

import torch
import torch.distributed as dist

import ds_helpers as h  # noqa: F401  (applies the CPU shims, imports deepspeed)
import teonspeed  # noqa: F401  (registers the optimizer types)


def main(config_path, out_path):
    torch.set_num_threads(1)
    config = json.load(open(config_path))
    losses, _, final, basic = _train(config)
    if dist.get_rank() == 0:
        json.dump(
            {"losses": losses, "optimizer": final, "basic": basic, "world_size": dist.get_world_size()},
            open(out_path, "w"),
        )
    dist.destroy_process_group()


def _train(config):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    return h.train(dist.get_rank(), dist.get_world_size(), config, steps=4)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
