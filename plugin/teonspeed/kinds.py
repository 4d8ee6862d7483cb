"""The three optimizers by name: what each is called in teonspeed and in a DeepSpeed config, the defaults
that tell them apart, and DeepSpeed's names of their options. Every other default is a field default of
`config.OptimizerConfig`.

No imports: the launcher reads this file before it imports torch (launch/rules.py).
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

# What a user of DeepSpeed's own Muon or AdamW writes in "params" (and Hugging Face's DeepSpeed config
# templates, `"betas": "auto", "eps": "auto"`): the AdamW part's options without their prefix.
ADAMW_ALIASES = {"betas": "adamw_betas", "eps": "adamw_eps", "adam_lr": "adamw_lr"}
# DeepSpeed's Muon: `muon_lr` is the matrices' lr (then `lr` is its Adam half's); `adam_w_mode` must be true.
DEEPSPEED_OPTIONS = ("muon_lr", "adam_w_mode")


def resolve_aliases(options):
    """Options under DeepSpeed's names -> ours (a new dict)."""
    out = dict(options)
    for alias, name in ADAMW_ALIASES.items():
        if alias in out:
            if name in out:
                raise ValueError(
                    f"teonspeed: options {alias!r} and {name!r} both set the AdamW part's "
                    f"{name[6:]}; keep one"
                )
            out[name] = out.pop(alias)
    if "muon_lr" in out:
        if "lr" in out and "adamw_lr" not in out:
            out["adamw_lr"] = out["lr"]
        out["lr"] = out.pop("muon_lr")
    if "adam_w_mode" in out and not out.pop("adam_w_mode"):
        raise ValueError(
            "teonspeed: option 'adam_w_mode' must be true: the AdamW part always decouples "
            "weight decay (Adam with L2 regularisation is not offered)"
        )
    return out
