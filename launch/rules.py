"""The rules a launch setup must satisfy, written once for the launcher's check (launch/options.py) and
the memory estimate (launch/memory/): megatron-core's layout divisibility, its padded vocabulary, TEON's
stacking across pipeline stages, and the optimizer names with their teonspeed defaults.

Imports nothing heavier than the standard library: the launcher checks a setup before torch loads.
teonspeed's names and kind defaults come from its torch-free `kinds.py`, read by path (see _teonspeed_kinds).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, List, Mapping, Optional


class LayoutError(ValueError):
    """A parallel layout megatron-core (or teonspeed) would refuse; the message names the flag and the fix."""


def _teonspeed_kinds() -> ModuleType:
    """teonspeed/kinds.py. `import teonspeed.kinds` would run the package's __init__, which imports torch
    (2 s) before a typo could be reported, so the pure-data file is loaded from where the package lives."""
    if "teonspeed" in sys.modules:
        return importlib.import_module("teonspeed.kinds")
    spec = importlib.util.find_spec("teonspeed")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("teonspeed is not importable: `pip install -e .` at the repository root")
    path = Path(next(iter(spec.submodule_search_locations))) / "kinds.py"
    if not path.is_file():
        raise ImportError(
            f"the teonspeed found at {path.parent} has no kinds.py: it is older than this "
            "launcher; `pip install -e .` at the repository root"
        )
    loaded = importlib.util.spec_from_file_location("launch._teonspeed_kinds", path)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


_kinds = _teonspeed_kinds()
ORTHO_OPTIMIZERS = _kinds.OPTIMIZER_KINDS  # teonspeed's: muon, teon, htmuon
OPTIMIZERS = (*ORTHO_OPTIMIZERS, "adamw")  # what --optimizer takes
ORTHO_TYPES = _kinds.DEEPSPEED_TYPE_NAMES  # their "type" in a DeepSpeed config
TEON_TYPES = _kinds.QKV_TYPES  # the layer types TEON stacks by default
resolve_aliases = _kinds.resolve_aliases  # DeepSpeed's option names -> teonspeed's
# DeepSpeed 0.19's own optimizer types (deepspeed/runtime/config.py; DeepSpeed lower-cases them).
DEEPSPEED_TYPES = (
    "Adagrad",
    "Adam",
    "AdamW",
    "Lamb",
    "MuAdam",
    "MuAdamW",
    "MuSGD",
    "Lion",
    "Muon",
    "OneBitAdam",
    "ZeroOneAdam",
    "OneBitLamb",
)
VOCAB_MULTIPLE = 128  # megatron's make_vocab_size_divisible_by default


def teon_k(optimizer: str, given: Optional[int] = None) -> int:
    """The TEON group size a run uses: 1 for Muon and AdamW (they do not stack; the launcher passes no
    --teon-k to them), else --teon-k or the optimizer's default."""
    if optimizer not in ORTHO_OPTIMIZERS or optimizer == "muon":
        return 1
    return _kinds.KIND_DEFAULTS[optimizer]["teon_k"] if given is None else given


def padded_vocab(vocab: int, tp: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """The embedding and output layer rows: the vocabulary padded to a multiple of `multiple` x TP (the
    output layer is split over the TP ranks)."""
    m = multiple * tp
    return (vocab + m - 1) // m * m


def moe_layers(num_layers: int, experts: Optional[int], freq: Any = 1) -> List[bool]:
    """Which layers are MoE layers: megatron's moe_layer_freq, an int (every freq-th layer, from layer 0)
    or one 0/1 per layer."""
    if not experts:
        return [False] * num_layers
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(num_layers)]
    if len(freq) != num_layers:
        raise LayoutError(f"moe_layer_freq has {len(freq)} entries for {num_layers} layers")
    return [bool(f) for f in freq]


def check_layout(
    t: Mapping[str, Any], tp: int = 1, pp: int = 1, ep: int = 1, dp: Optional[int] = None
) -> None:
    """Megatron's divisibility rules for TP x PP x EP (and, given dp, the expert-data-parallel size) on a
    model described by megatron's TransformerConfig fields `t`. Raises LayoutError naming the flag."""
    for flag, size in (("tp", tp), ("pp", pp), ("ep", ep)):
        if size < 1:
            raise LayoutError(f"--{flag} must be at least 1, got {size}")
    layers, heads = t["num_layers"], t["num_attention_heads"]
    groups = t.get("num_query_groups") or heads
    if layers % pp:
        raise LayoutError(f"--pp {pp} does not divide num_layers={layers}; use a --pp that divides it")
    if heads % tp or groups % tp:
        raise LayoutError(
            f"--tp {tp} must divide the attention heads ({heads}) and query groups ({groups}); "
            "use a --tp that divides both"
        )
    experts = t.get("num_moe_experts")
    ffn = t["ffn_hidden_size"]
    if not all(moe_layers(layers, experts, t.get("moe_layer_freq", 1))) and ffn % tp:
        raise LayoutError(
            f"--tp {tp} does not divide ffn_hidden_size={ffn} (Megatron splits the MLP over "
            "TP); use a --tp that divides it, or a model config with a TP-friendly "
            "ffn_hidden_size"
        )
    if ep > 1 and not experts:
        raise LayoutError(f"--ep {ep} needs a MoE model (num_moe_experts in --model-config); use --ep 1")
    if not experts:
        return
    if experts % ep:
        raise LayoutError(f"--ep {ep} does not divide num_moe_experts={experts}; use an --ep that divides it")
    moe_ffn = t.get("moe_ffn_hidden_size") or ffn
    etp = t.get("expert_tensor_parallel_size") or tp
    if moe_ffn % etp:
        raise LayoutError(
            f"expert tensor parallel {etp} does not divide moe_ffn_hidden_size={moe_ffn}; "
            "use a --tp that divides it"
        )
    if dp is not None and (tp * dp) % (etp * ep):
        raise LayoutError(
            f"expert tensor parallel {etp} x --ep {ep} must divide TP x DP = {tp * dp} (the "
            "expert layers re-cut the same ranks); choose sizes that do"
        )


def check_teon_stages(optimizer: str, given_k: Optional[int], num_layers: int, pp: int) -> None:
    """TEON's group size against the layers of a pipeline stage: no larger (else no TEON stack forms and a run
    named teon trains per-layer Muon), dividing them (a group never crosses a stage boundary, and no trailing
    layers fall back to Muon); and only for the optimizers that stack."""
    if optimizer not in ("teon", "htmuon"):
        if given_k is not None:
            raise LayoutError(
                f"--teon-k is TEON's and HTMuon's group size; --optimizer {optimizer} would "
                f"ignore it: drop --teon-k, or use --optimizer teon"
            )
        return
    k, per_stage = teon_k(optimizer, given_k), num_layers // pp
    layers = f"{per_stage} layers per pipeline stage" if pp > 1 else f"{per_stage} layers"
    if k < 1:
        raise LayoutError(f"--teon-k must be at least 1, got {k}")
    if k > per_stage:  # no TEON stack would form: a run named teon would train per-layer Muon
        raise LayoutError(
            f"--teon-k {k} is more than the {layers} (num_layers={num_layers}, --pp {pp}): no "
            f"TEON stack would form; use a --teon-k that divides {per_stage}"
        )
    if per_stage % k:
        why = "a TEON group would span two stages" if pp > 1 else "the last layers would fall back to Muon"
        raise LayoutError(
            f"--teon-k {k} does not divide the {layers} (num_layers={num_layers}, --pp {pp}): "
            f"{why}; use a --teon-k that divides {per_stage}" + (", or a smaller --pp" if pp > 1 else "")
        )
