"""The one options object. Every entry point (the Python API, DeepSpeed's "params", Megatron's
TeonOptimizerConfig, the launcher) builds an `OptimizerConfig` through `make_config`; it is checked in
`__post_init__`, once, before any optimizer state exists, and cannot change afterwards (frozen).

Every default is written once: a field default below, or, for the three options where Muon, TEON and
HTMuon differ (orthogonalizer, lr_scale, teon_k), in kinds.KIND_DEFAULTS, which `make_config` fills in.
`default(option, kind)` reads either.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from .kinds import (
    ADAMW_ALIASES,
    DEEPSPEED_OPTIONS,
    KIND_DEFAULTS,
    OPTIMIZER_KINDS,
    QKV_TYPES,
    resolve_aliases,
)
from .ortho import HEAVY_TAIL_METHODS, NS_BACKENDS, NS_STEPS, ORTHOGONALIZERS, num_square_roots

LR_SCALES = ("spectral", "fan_ratio", "rms_match", "none")
NS_DTYPES = ("auto", "fp32", "bf16")
COMM_DTYPES = ("auto", "fp32", "bf16")
PARALLEL_MODES = ("auto", "distributed", "replicated")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Options of Muon, TEON and HTMuon; `make_config(kind, options)` builds one with that optimizer's
    defaults. Each field is checked when the object is made (type, finiteness, range)."""

    lr: float = 0.02
    """Learning rate of the orthogonalized matrices (units: spectral norm per step before lr_scale)."""
    momentum: float = 0.95
    """EMA momentum β: M ← βM + (1−β)G."""
    nesterov: bool = True
    """Orthogonalize (1−β)G + βM instead of M."""
    weight_decay: float = 0.0
    """Decoupled weight decay of the orthogonalized matrices: W ← W(1 − lr·wd)."""
    orthogonalizer: str
    """ns5 | polar_express | svd. Its default depends on the optimizer (kinds.KIND_DEFAULTS)."""
    ns_steps: int = NS_STEPS
    """Iterations of ns5/polar_express."""
    ns_dtype: str = "auto"
    """Compute dtype of the iteration: auto (bf16 on GPU; on the CPU bf16 only where a cached timing probe
    finds it faster, see teonspeed.ortho.compute_dtype; TEONSPEED_CPU_BF16=0/1 fixes it), fp32 or bf16."""
    ns_backend: str = "auto"
    """Newton–Schulz implementation: auto (the Triton kernels of teonspeed.ortho.kernels for CUDA tensors when
    triton imports, torch otherwise), torch, or triton (an error where it cannot run)."""
    lr_scale: str
    """spectral √max(1,m/n) | fan_ratio √(m/n) | rms_match 0.2·√max(m,n) | none. Its default depends on
    the optimizer (kinds.KIND_DEFAULTS)."""
    teon_k: int
    """TEON group size: matrices of one type from this many consecutive blocks are stacked (Muon: 1).
    Its default depends on the optimizer (kinds.KIND_DEFAULTS)."""
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
    """lr of the AdamW part (embeddings, output head, norms, biases)."""
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

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, CHECKS[f.name](f.name, getattr(self, f.name)))
        if self.ht_method == "ns":
            try:
                num_square_roots(self.ht_power)
            except ValueError as err:
                raise ValueError(f"teonspeed: option 'ht_power' {err}") from None
        if self.qk_clip_log and self.qk_clip is not None:
            raise ValueError(
                "teonspeed: option 'qk_clip_log' logs the max logit without clipping; unset "
                "'qk_clip' (or drop qk_clip_log to clip)"
            )


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(OptimizerConfig))
_FIELDS = {f.name: f for f in dataclasses.fields(OptimizerConfig)}


def default(option: str, kind: str = "muon") -> Any:
    """The default of `option` for optimizer `kind`: for callers that show it or pass it on (the launcher,
    the benches), so that none of them writes it again."""
    if option in KIND_DEFAULTS[kind]:
        return KIND_DEFAULTS[kind][option]
    return _FIELDS[option].default


# -- the checks: one per field, each returning the value as stored (sequences become tuples) ---------


def _refuse(option: str, expected: str, value: Any) -> None:
    hint = ""
    if isinstance(value, str) and value == "auto":
        hint = '; "auto" is filled in by the Hugging Face Trainer, which DeepSpeed alone does not do'
    raise ValueError(
        f"teonspeed: option {option!r} must be {expected}, got {value!r} ({type(value).__name__}){hint}"
    )


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _real(low: float, high: Optional[float] = None, *, low_open: bool = False, high_open: bool = True):
    """A finite number from low to high (included unless open); high None: no upper bound."""
    if high is not None:  # (a number in a bounded range is finite)
        expected = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    else:
        expected = f"a finite number {'>' if low_open else '>='} {low}"

    def valid(value: Any) -> bool:
        if not _is_real(value):
            return False
        above = value > low if low_open else value >= low
        return above and (high is None or (value < high if high_open else value <= high))

    def check(option: str, value: Any) -> Any:
        if not valid(value):
            _refuse(option, expected, value)
        return value

    check.valid, check.expected = valid, expected
    return check


def _integer(low: int):
    def check(option: str, value: Any) -> Any:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
            _refuse(option, f"an integer >= {low}", value)
        return value

    return check


def _one_of(choices: Tuple):
    kind = str if isinstance(choices[0], str) else numbers.Integral

    def check(option: str, value: Any) -> Any:
        if not isinstance(value, kind) or isinstance(value, bool) or value not in choices:
            _refuse(option, f"one of {choices}", value)
        return value

    return check


def _flag(option: str, value: Any) -> Any:
    if not isinstance(value, bool):
        _refuse(option, "true or false", value)
    return value


def _betas(option: str, value: Any) -> Any:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(_is_real(b) and 0 <= b < 1 for b in value)
    ):
        _refuse(option, "two numbers in [0, 1)", value)
    return tuple(value)


def _layer_types(option: str, value: Any) -> Any:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        _refuse(option, "a list of layer types (teonspeed.grouping.LAYER_TYPES)", value)
    return tuple(value)


def _cluster(option: str, value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        _refuse(option, "a mapping of teonspeed.parallel.cost.ClusterProfile fields to numbers", value)
    from .parallel.cost import cluster_profile

    cluster_profile(value)  # names unknown fields and bad values
    return dict(value)


def _or_none(check):
    """A number `check` takes, or None (the option off)."""

    def either(option: str, value: Any) -> Any:
        if value is not None and not check.valid(value):
            _refuse(option, f"None (off) or {check.expected}", value)
        return value

    return either


def _callable_or_none(option: str, value: Any) -> Any:
    if value is not None and not callable(value):
        _refuse(option, "a callable name -> LayerRef | None, or None", value)
    return value


CHECKS: Dict[str, Callable[[str, Any], Any]] = {
    "lr": _real(0),
    "momentum": _real(0, 1),
    "nesterov": _flag,
    "weight_decay": _real(0),
    "orthogonalizer": _one_of(ORTHOGONALIZERS),
    "ns_steps": _integer(1),
    "ns_dtype": _one_of(NS_DTYPES),
    "ns_backend": _one_of(NS_BACKENDS),
    "lr_scale": _one_of(LR_SCALES),
    "teon_k": _integer(1),
    "teon_mode": _one_of((1, 2)),
    "teon_types": _layer_types,
    "split_fused": _flag,
    "ht_power": _real(0),
    "ht_method": _one_of(HEAVY_TAIL_METHODS),
    "ht_interval": _integer(1),
    "adamw_lr": _real(0),
    "adamw_betas": _betas,
    "adamw_eps": _real(0, low_open=True),
    "adamw_weight_decay": _real(0),
    "skip_nonfinite": _flag,
    "cut_groups_at_stage_boundary": _flag,
    "parallel_mode": _one_of(PARALLEL_MODES),
    "overlap_waves": _integer(1),
    "comm_dtype": _one_of(COMM_DTYPES),
    "cluster": _cluster,
    "qk_clip": _or_none(_real(0, low_open=True)),
    "qk_clip_alpha": _real(0, 1, high_open=False),
    "qk_clip_log": _flag,
    "teon_per_layer_fallback": _flag,
    "grouping_rule": _callable_or_none,
}


# -- building one from user options -------------------------------------------------------------------

# Every name make_config takes: our options, and DeepSpeed's names of some of them (kinds.py).
ACCEPTED_OPTIONS = OPTION_NAMES + tuple(ADAMW_ALIASES) + DEEPSPEED_OPTIONS


def make_config(kind: str, options: Mapping[str, Any]) -> OptimizerConfig:
    """The config of optimizer `kind` from user options (ours, or DeepSpeed's names of the same things:
    ADAMW_ALIASES, DEEPSPEED_OPTIONS); an option given as None takes its default. Unknown keys are named
    with the closest accepted one."""
    if not isinstance(kind, str) or kind.lower() not in OPTIMIZER_KINDS:
        raise ValueError(f"teonspeed: unknown optimizer {kind!r}; choose one of {OPTIMIZER_KINDS}")
    kind = kind.lower()
    options = resolve_aliases(options)
    unknown = [k for k in options if k not in OPTION_NAMES]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), ACCEPTED_OPTIONS, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"teonspeed: unknown option(s) {', '.join(hints)} for {kind}; valid options are: "
            f"{', '.join(OPTION_NAMES)}; and DeepSpeed's names {', '.join(ADAMW_ALIASES)}, "
            f"{', '.join(DEEPSPEED_OPTIONS)}"
        )
    if kind == "muon" and options.get("teon_k") not in (None, 1):
        raise ValueError("teonspeed: option 'teon_k' must be 1 for Muon; use teonspeed.TEON to stack layers")
    given = {k: v for k, v in options.items() if v is not None}
    return OptimizerConfig(**{**KIND_DEFAULTS[kind], **given})
