"""The three optimizers by name: what each is called in teonspeed and in a DeepSpeed config, and the
defaults that tell them apart. Every other default is a field default of `config.OptimizerConfig`.

Pure data with no imports: the launcher reads this file before it imports torch (launch/rules.py).
"""

OPTIMIZER_KINDS = ("muon", "teon", "htmuon")

# `"optimizer": {"type": ...}` in a DeepSpeed config. DeepSpeed lower-cases "Muon" to its own built-in
# optimizer, so ours carry a prefix that cannot collide.
DEEPSPEED_TYPE_NAMES = {"teon": "TEON", "muon": "TeonspeedMuon", "htmuon": "TeonspeedHTMuon"}

# The attention projections that produce queries, keys and values, by the layer types that
# `grouping.layer_types` assigns (MLA's up-projections play the same role as q/k/v): TEON stacks these.
QKV_TYPES = ("q", "k", "v", "q_up", "k_up", "v_up")

# The options whose default depends on the optimizer. TEON's are the paper's (arXiv 2601.23261):
# Polar Express, the fan ratio √(m/n) per member, two consecutive blocks per stack.
_MUON = {"orthogonalizer": "ns5", "lr_scale": "spectral", "teon_k": 1}
KIND_DEFAULTS = {
    "muon": _MUON,
    "teon": {"orthogonalizer": "polar_express", "lr_scale": "fan_ratio", "teon_k": 2},
    "htmuon": _MUON,
}
