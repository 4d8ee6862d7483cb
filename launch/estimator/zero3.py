"""What ZeRO-3 keeps on a GPU beyond its shards: the parameters DeepSpeed never partitions (the small ones,
kept whole) and the working set it all-gathers for forward and backward (the module being computed plus
the prefetched ones, capped by max_live_parameters).

The sizes are DeepSpeed 0.19.8's defaults (deepspeed/runtime/zero/config.py, DeepSpeedZeroConfig), in
parameter elements; a run that sets the stage3_* keys in its --ds-config is estimated at the defaults."""

from __future__ import annotations

import math
from typing import Dict, List

from launch.estimator.activations import Training
from launch.estimator.params import ModelSpec, Parallel, parameter_tensors, stage_of

PREFETCH_BUCKET_SIZE = 50_000_000  # stage3_prefetch_bucket_size: elements fetched ahead of use
MAX_LIVE_PARAMETERS = 1_000_000_000  # stage3_max_live_parameters: gathered elements resident at once
# stage3_param_persistence_threshold: a parameter of at most this many elements is never partitioned
# (parameter_offload.py: `param.ds_numel <= param_threshold` -> ds_persist)
PARAM_PERSISTENCE_THRESHOLD = 100_000


def stage_tensor_sizes(spec: ModelSpec, par: Parallel, stage: int) -> List[int]:
    """The element count, on one rank, of every parameter tensor of a pipeline stage (each local expert
    its own tensor: DeepSpeed gathers and persists per tensor)."""
    sizes: List[int] = []
    for t in parameter_tensors(spec, par):
        if stage in stage_of(t, spec, par.pp):
            sizes += [math.prod(t.shape) // t.split] * t.copies
    return sizes


def zero3_param_bytes(spec: ModelSpec, par: Parallel, train: Training, stage: int) -> Dict[str, float]:
    """persistent_params: the whole copy DeepSpeed keeps of every tensor at or under the persistence
    threshold (on top of its shard, counted with the weights). gathered_params: the largest partitioned
    tensor, gathered whole while its module runs, plus up to one prefetch bucket of the next ones, never
    more than max_live_parameters; held during forward and backward only, alongside the activations."""
    sizes = stage_tensor_sizes(spec, par, stage)
    persistent = sum(n for n in sizes if n <= PARAM_PERSISTENCE_THRESHOLD)
    partitioned = [n for n in sizes if n > PARAM_PERSISTENCE_THRESHOLD]
    largest = max(partitioned, default=0)
    prefetched = min(PREFETCH_BUCKET_SIZE, sum(partitioned) - largest)
    live = min(MAX_LIVE_PARAMETERS, largest + prefetched)
    return {
        "persistent_params": persistent * train.weight_bytes,
        "gathered_params": live * train.weight_bytes,
    }
