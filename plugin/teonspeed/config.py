"""The one options object: every entry point (Python, DeepSpeed JSON, Megatron config, launch YAML)
converts into `OptimizerConfig` and is validated here, once, before any optimizer state exists."""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from .ortho import HEAVY_TAIL_METHODS, NS_BACKENDS, ORTHOGONALIZERS

LR_SCALES = ("spectral", "fan_ratio", "rms_match", "none")
NS_DTYPES = ("auto", "fp32", "bf16")
COMM_DTYPES = ("auto", "fp32", "bf16")
PARALLEL_MODES = ("auto", "distributed", "replicated")
OPTIMIZER_KINDS = ("muon", "teon", "htmuon")

# The attention projections that produce queries, keys and values, by the layer types that
# `grouping.layer_types` assigns (MLA's up-projections play the same role as q/k/v).
QKV_TYPES = ("q", "k", "v", "q_up", "k_up", "v_up")


@dataclass
class OptimizerConfig:
    """Options of Muon, TEON and HTMuon. `None` means "the default of that optimizer" (see DEFAULTS)."""

    lr: float = 0.02
    """Learning rate of the orthogonalized matrices (units: spectral norm per step before lr_scale)."""
    momentum: float = 0.95
    """EMA momentum β: M ← βM + (1−β)G."""
    nesterov: bool = True
    """Orthogonalize (1−β)G + βM instead of M."""
    weight_decay: float = 0.0
    """Decoupled weight decay of the orthogonalized matrices: W ← W(1 − lr·wd)."""
    orthogonalizer: Optional[str] = None
    """ns5 | polar_express | svd. Default: ns5 for Muon, polar_express for TEON (the paper's), ns5 for HTMuon."""
    ns_steps: Optional[int] = None
    """Iterations of ns5/polar_express (default 5)."""
    ns_dtype: str = "auto"
    """Compute dtype of the iteration: auto (bf16 on GPU; on the CPU bf16 only where a cached timing probe finds
    it faster, see teonspeed.ortho.compute_dtype; TEONSPEED_CPU_BF16=0/1 fixes it), fp32 or bf16."""
    ns_backend: str = "auto"
    """Newton–Schulz implementation: auto (the Triton kernels of teonspeed.ortho.kernels for CUDA tensors when
    triton imports, torch otherwise), torch, or triton (an error where it cannot run)."""
    lr_scale: Optional[str] = None
    """spectral √max(1,m/n) | fan_ratio √(m/n) | rms_match 0.2·√max(m,n) | none.
    Default: spectral for Muon and HTMuon, fan_ratio for TEON (the paper's)."""
    teon_k: Optional[int] = None
    """TEON group size: matrices of one type from this many consecutive blocks are stacked. Muon: 1."""
    teon_mode: int = 1
    """Unfolding mode: 1 concatenates along the input dim (the paper's), 2 along the output dim."""
    teon_types: Tuple[str, ...] = QKV_TYPES
    """Layer types that TEON stacks; everything else gets per-matrix Muon. See grouping.LAYER_TYPES."""
    split_fused: bool = True
    """Split fused QKV / gated-MLP weights into their parts before orthogonalizing."""
    ht_power: float = 0.125
    """HTMuon exponent p in U Σᵖ Vᵀ (0 is Muon, 1 is momentum SGD)."""
    ht_method: str = "svd"
    """HTMuon transform: svd (exact) or ns (polar(N)·(NᵀN)^{p/2}; needs p = 2⁻ᵏ)."""
    ht_interval: int = 1
    """HTMuon: heavy-tailed update every this many steps, plain orthogonalization in between."""
    adamw_lr: float = 3e-4
    adamw_betas: Tuple[float, float] = (0.9, 0.95)
    adamw_eps: float = 1e-8
    adamw_weight_decay: float = 0.0
    skip_nonfinite: bool = True
    """Skip the whole step (weights and state untouched, with a warning) when a gradient is NaN/Inf."""
    cut_groups_at_stage_boundary: bool = False
    """Pipeline parallelism: let a TEON group that would span two stages fall back to Muon instead of
    refusing the layout (the update then depends on the PP size; `plan` lists the cut groups)."""
    teon_per_layer_fallback: bool = False
    """TEON: accept a teon_k that forms no TEON stack (more than the blocks, per pipeline stage), every
    matrix then getting per-layer Muon; without it such a teon_k is refused at construction."""
    parallel_mode: str = "auto"
    """distributed: each group is orthogonalized once, by one owner rank; replicated: every rank
    gathers and computes everything (the simple baseline); auto: per group, whichever of the two the
    `cluster` constants predict is cheaper (teonspeed.parallel.placement; `opt.plan` shows each choice)."""
    overlap_waves: int = 2
    """distributed mode: exchange in this many waves, so one wave's transform overlaps the next wave's
    gather and the previous wave's scatter (1: no overlap, the fewest collectives)."""
    comm_dtype: str = "auto"
    """distributed/replicated modes: dtype of the exchanged shards and updates. auto: the gradients' dtype
    (fp32 master grads stay fp32); bf16 halves the bytes (every rank, owners included, sees the same
    rounded values, so replicas stay identical); fp32."""
    cluster: Optional[Dict[str, float]] = None
    """Overrides of the hardware constants (teonspeed.parallel.cost.ClusterProfile: bandwidths, latencies,
    FLOP rate) that placement decisions are made with; the same on every rank. Default: H100 + 400 Gb/s IB."""
    qk_clip: Optional[float] = None
    """QK-clip (MuonClip) threshold τ: after each step, an attention head whose largest pre-softmax logit S
    exceeded τ gets its query rows scaled by (τ/S)^α and its key rows by (τ/S)^(1−α) (teonspeed.qk_clip; needs
    the model: pass the nn.Module, or teonspeed.qk_clip.attach(model, opt)). None: off."""
    qk_clip_alpha: float = 0.5
    """QK-clip: the share α of the rescale that goes to the queries (the keys get 1 − α)."""
    qk_clip_log: bool = False
    """Capture and report the largest attention logit (opt.qk_clip.max_logit) without clipping."""
    grouping_rule: Optional[Callable[[str], Any]] = field(default=None, repr=False)
    """Optional callable name -> grouping.LayerRef | None that overrides the built-in name rules."""

    def validate(self) -> "OptimizerConfig":
        def need(cond: bool, option: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"teonspeed: option {option!r} {msg}")

        need(self.lr >= 0, "lr", f"must be >= 0, got {self.lr}")
        need(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        need(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        need(self.orthogonalizer in ORTHOGONALIZERS, "orthogonalizer",
             f"must be one of {ORTHOGONALIZERS}, got {self.orthogonalizer!r}")
        need(self.ns_steps is None or (isinstance(self.ns_steps, int) and self.ns_steps >= 1), "ns_steps",
             f"must be a positive integer, got {self.ns_steps!r}")
        need(self.ns_dtype in NS_DTYPES, "ns_dtype", f"must be one of {NS_DTYPES}, got {self.ns_dtype!r}")
        need(self.ns_backend in NS_BACKENDS, "ns_backend", f"must be one of {NS_BACKENDS}, got {self.ns_backend!r}")
        need(self.lr_scale in LR_SCALES, "lr_scale", f"must be one of {LR_SCALES}, got {self.lr_scale!r}")
        need(isinstance(self.teon_k, int) and self.teon_k >= 1, "teon_k",
             f"must be an integer >= 1, got {self.teon_k!r}")
        need(self.teon_mode in (1, 2), "teon_mode", f"must be 1 or 2, got {self.teon_mode!r}")
        need(self.ht_power >= 0, "ht_power", f"must be >= 0, got {self.ht_power}")
        need(self.ht_method in HEAVY_TAIL_METHODS, "ht_method",
             f"must be one of {HEAVY_TAIL_METHODS}, got {self.ht_method!r}")
        need(isinstance(self.ht_interval, int) and self.ht_interval >= 1, "ht_interval",
             f"must be an integer >= 1, got {self.ht_interval!r}")
        need(self.adamw_lr >= 0, "adamw_lr", f"must be >= 0, got {self.adamw_lr}")
        need(len(tuple(self.adamw_betas)) == 2 and all(0 <= b < 1 for b in self.adamw_betas), "adamw_betas",
             f"must be two numbers in [0, 1), got {self.adamw_betas!r}")
        need(self.adamw_eps > 0, "adamw_eps", f"must be > 0, got {self.adamw_eps}")
        need(self.parallel_mode in PARALLEL_MODES, "parallel_mode",
             f"must be one of {PARALLEL_MODES}, got {self.parallel_mode!r}")
        need(isinstance(self.overlap_waves, int) and self.overlap_waves >= 1, "overlap_waves",
             f"must be an integer >= 1, got {self.overlap_waves!r}")
        need(self.comm_dtype in COMM_DTYPES, "comm_dtype", f"must be one of {COMM_DTYPES}, got {self.comm_dtype!r}")
        tau = self.qk_clip
        need(tau is None or (_is_number(tau) and math.isfinite(tau) and tau > 0), "qk_clip",
             f"must be None (off) or a finite number > 0 (the max logit τ), got {tau!r}")
        need(_is_number(self.qk_clip_alpha) and 0 <= self.qk_clip_alpha <= 1, "qk_clip_alpha",
             f"must be a number in [0, 1], got {self.qk_clip_alpha!r}")
        need(isinstance(self.qk_clip_log, bool), "qk_clip_log",
             f"must be true or false, got {self.qk_clip_log!r}")
        need(not (self.qk_clip_log and self.qk_clip is not None), "qk_clip_log",
             "logs the max logit without clipping; unset 'qk_clip' (or drop qk_clip_log to clip)")
        if self.cluster is not None:
            from .parallel.cost import cluster_profile
            cluster_profile(self.cluster)
        self.teon_types = tuple(self.teon_types)
        self.adamw_betas = tuple(self.adamw_betas)
        if self.ht_method == "ns":
            from .ortho import _num_square_roots
            try:
                _num_square_roots(self.ht_power)
            except ValueError as err:
                raise ValueError(f"teonspeed: option 'ht_power' {err}") from None
        return self


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


DEFAULTS: Dict[str, Dict[str, Any]] = {
    "muon": {"orthogonalizer": "ns5", "lr_scale": "spectral", "teon_k": 1},
    "teon": {"orthogonalizer": "polar_express", "lr_scale": "fan_ratio", "teon_k": 2},
    "htmuon": {"orthogonalizer": "ns5", "lr_scale": "spectral", "teon_k": 1},
}
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(OptimizerConfig))


# What a user of DeepSpeed's own Muon or AdamW writes in "params" (and Hugging Face's DeepSpeed config
# templates, `"betas": "auto", "eps": "auto"`): the AdamW part's options without their prefix.
ADAMW_ALIASES = {"betas": "adamw_betas", "eps": "adamw_eps", "adam_lr": "adamw_lr"}


def resolve_aliases(options: Mapping[str, Any]) -> Dict[str, Any]:
    """Options under DeepSpeed's names -> ours. DeepSpeed's Muon takes `muon_lr` for the matrices and then
    `lr` for its Adam half; `adam_w_mode` must stay true (the AdamW part decouples weight decay)."""
    out = dict(options)
    for alias, name in ADAMW_ALIASES.items():
        if alias in out:
            if name in out:
                raise ValueError(f"teonspeed: options {alias!r} and {name!r} both set the AdamW part's {name[6:]}; "
                                 f"keep one")
            out[name] = out.pop(alias)
    if "muon_lr" in out:
        if "lr" in out and "adamw_lr" not in out:
            out["adamw_lr"] = out["lr"]
        out["lr"] = out.pop("muon_lr")
    if "adam_w_mode" in out and not out.pop("adam_w_mode"):
        raise ValueError("teonspeed: option 'adam_w_mode' must be true: the AdamW part always decouples weight "
                         "decay (Adam with L2 regularisation is not offered)")
    return out


def make_config(kind: str, options: Mapping[str, Any]) -> OptimizerConfig:
    """Build and validate the config of optimizer `kind` from user options (ours, or DeepSpeed's names of
    the same things: ADAMW_ALIASES, muon_lr, adam_w_mode), naming any unknown key."""
    kind = kind.lower()
    if kind not in OPTIMIZER_KINDS:
        raise ValueError(f"teonspeed: unknown optimizer {kind!r}; choose one of {OPTIMIZER_KINDS}")
    options = resolve_aliases(options)
    unknown = [k for k in options if k not in OPTION_NAMES]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, OPTION_NAMES, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"teonspeed: unknown option(s) {', '.join(hints)} for {kind}; "
                         f"valid options are: {', '.join(OPTION_NAMES)} (and DeepSpeed's names "
                         f"{', '.join(ADAMW_ALIASES)}, muon_lr, adam_w_mode)")
    if kind == "muon" and options.get("teon_k", 1) != 1:
        raise ValueError("teonspeed: option 'teon_k' must be 1 for Muon; use teonspeed.TEON to stack layers")
    values = dict(DEFAULTS[kind])
    values.update({k: v for k, v in options.items() if v is not None or k not in DEFAULTS[kind]})
    return OptimizerConfig(**values).validate()
