"""teonspeed: Muon, TEON and HTMuon for DeepSpeed and Megatron-core jobs.

import teonspeed
opt = teonspeed.TEON(model, lr=0.02, adamw_lr=3e-4)
print(opt.plan)
"""

from .config import OptimizerConfig, make_config
from .fused import FusedLayout, annotate_model, gated_mlp_layout, mla_kv_up_layout, qkv_layout
from .grouping import LayerRef, layer_ref
from .optim import HTMuon, Muon, OrthoOptimizer, TEON
from .ortho import heavy_tail, orthogonalize
from .parallel.context import ParallelContext, megatron_context
from .parallel.shard_spec import ShardSpec, megatron_shard_specs
from .plan import Plan, plan
from . import qk_clip  # noqa: F401  (teonspeed.qk_clip.attach(model, optimizer); option qk_clip=τ)

__version__ = "0.1.0"

from . import deepspeed  # noqa: E402, F401  (teonspeed.deepspeed.MegatronMPU; imports DeepSpeed only when used)
from .integrations import deepspeed_hook  # noqa: E402

# the DeepSpeed config types, registered when DeepSpeed is imported (before or after)
deepspeed_hook.install()


def __getattr__(name):
    # teonspeed.megatron imports megatron-core: loaded on first use, never by `import teonspeed`
    if name == "megatron":
        import importlib

        return importlib.import_module(".megatron", __name__)
    raise AttributeError(f"module 'teonspeed' has no attribute {name!r}")


__all__ = [
    "orthogonalize",
    "heavy_tail",
    "Muon",
    "TEON",
    "HTMuon",
    "OrthoOptimizer",
    "OptimizerConfig",
    "make_config",
    "plan",
    "Plan",
    "LayerRef",
    "layer_ref",
    "FusedLayout",
    "qkv_layout",
    "gated_mlp_layout",
    "mla_kv_up_layout",
    "annotate_model",
    "ShardSpec",
    "ParallelContext",
    "megatron_context",
    "megatron_shard_specs",
]
