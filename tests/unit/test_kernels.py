"""Triton Newton–Schulz kernels (teonspeed.ortho.kernels), checked on the CPU through Triton's interpreter.

The interpreter only works when TRITON_INTERPRET=1 is set before triton's first import, and in a
pytest session triton is often already imported (torch._dynamo imports it). Setting the variable for
the whole session would also leak into every later test and subprocess, and on a GPU machine turn
their Triton kernels into interpreted ones. So the interpreted checks run in ONE fresh subprocess
(this file run as a script, `--worker`), which reports a JSON verdict per check; each check is then
a separate pytest test here. Everything else runs in-process and never runs a kernel.

Skipped, with the reason shown, only when triton is not importable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict

if __name__ == "__main__" and "--worker" in sys.argv:
    # Before torch/triton are imported: the worker process is the interpreter's.
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for support.tolerance

import pytest  # noqa: E402
import torch  # noqa: E402

from teonspeed.ortho import kernels  # noqa: E402
from teonspeed.ortho.kernels import flops_per_step, lower_tile_pairs, sym_grid  # noqa: E402
from teonspeed.ortho.coefficients import Schedule, schedule_for  # noqa: E402
from teonspeed.ortho.newton_schulz import newton_schulz  # noqa: E402
from support import tolerance as tol  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NEEDS_TRITON = pytest.mark.skipif(
    not kernels.triton_importable(), reason=f"triton is not importable ({kernels.TRITON_IMPORT_ERROR})"
)
WORKER_TIMEOUT_S = 240


# ----------------------------------------------------------------------------- in-process, no kernel runs


def test_lower_tile_pairs_cover_one_triangle_once():
    for t in (1, 2, 3, 5):
        pairs = lower_tile_pairs(t)
        assert len(pairs) == len(set(pairs)) == t * (t + 1) // 2
        assert all(i >= j for i, j in pairs)
        assert set(pairs) == {(i, j) for i in range(t) for j in range(t) if i >= j}
    assert sym_grid(40, 3, 16) == (6, 3)  # 3 row tiles: 6 programs per matrix, not 9
    assert sym_grid(16, 1, 16) == (1, 1)


def test_flop_convention():
    m, n = 64, 256
    full = flops_per_step(m, n, symmetric=False)
    half = flops_per_step(m, n, symmetric=True)
    assert full == 2 * m * m * n + 2 * m**3 + 2 * m * m * n
    assert half == m * m * n + m**3 + 2 * m * m * n
    assert flops_per_step(n, m, symmetric=True) == half  # tall inputs run transposed


def test_import_without_triton_never_fails():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, teonspeed.ortho.kernels as k\n"
        "assert not k.triton_importable() and not k.triton_available(torch.zeros(2, 2))\n"
        "assert k.lower_tile_pairs(2) == [(0, 0), (1, 0), (1, 1)]\n"
        "try:\n"
        "    k.newton_schulz_triton(torch.zeros(2, 2), None, torch.float32)\n"
        "except ImportError as e:\n"
        "    print('OK', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


@NEEDS_TRITON
def test_triton_available_rules(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kernels.triton_available(torch.zeros(2, 2))  # CPU tensor, no interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # In this process triton was imported without the interpreter, which then cannot run.
    assert kernels.triton_available(torch.zeros(2, 2)) == kernels.interpreter_ready()


@NEEDS_TRITON
@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="the session itself runs the interpreter"
)
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_kernels_compile_for_sm90(monkeypatch, tmp_path):
    """The real (not interpreted) code path: both kernels lower to PTX and a cubin for an H100 with
    tensor-core MMA, using the ptxas inside the triton wheel. No GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from teonspeed.ortho.kernels import newton_schulz_triton as _  # noqa: F401  (module is loaded)

    impl = sys.modules["teonspeed.ortho.kernels.newton_schulz_triton"]
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sym, upd = impl._kernels()
    ints = lambda names: {n: "i32" for n in names}  # noqa: E731
    flags = dict(UPCAST=False, IEEE=False, RNE_BF16=False)
    sym_sig = {
        "p_ptr": "*bf16",
        "c_ptr": "*bf16",
        "out_ptr": "*bf16",
        "pairs_ptr": "*i32",
        **ints(["M", "K", "s_pb", "s_pm", "s_pk", "s_cb", "s_cm", "s_cn", "s_ob", "s_om", "s_on"]),
        "alpha": "fp32",
        "beta": "fp32",
    }
    sym_const = dict(HAS_C=True, MIRROR=True, BLOCK_M=128, BLOCK_K=64, **flags)
    upd_sig = {
        "b_ptr": "*bf16",
        "x_ptr": "*bf16",
        "out_ptr": "*bf16",
        **ints(["M", "N", "s_bb", "s_bm", "s_bk", "s_xb", "s_xm", "s_xn", "s_ob", "s_om", "s_on"]),
        "a_coef": "fp32",
    }
    upd_const = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, **flags)
    for fn, sig, const in ((sym, sym_sig, sym_const), (upd, upd_sig, upd_const)):
        sig = {**sig, **{k: "constexpr" for k in const}}
        src = triton.compiler.ASTSource(fn, sig, constexprs=const)
        compiled = triton.compile(
            src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3}
        )
        assert len(compiled.asm["cubin"]) > 0
        assert "mma" in compiled.asm["ptx"], f"{fn.__name__}: no tensor-core MMA in the PTX"


@NEEDS_TRITON
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="compiled-kernel check: needs a CUDA device (the interpreted checks below cover the CPU)",
)
@pytest.mark.parametrize("method", ["ns5", "polar_express"])
def test_cuda_compiled_kernels_match_torch(method):
    sched = schedule_for(method, 5)
    g = torch.Generator("cuda").manual_seed(0)
    for shape in ((4, 256, 512), (1024, 1024), (3, 768, 300)):
        x = torch.randn(*shape, device="cuda", generator=g)
        # fp32 kernels multiply in IEEE fp32 (not TF32): each side's own fp32 iteration rounding (√2 of one)
        y32 = kernels.newton_schulz_triton(x, sched, torch.float32)
        bound32 = 2**0.5 * tol.ns_error_rms(0.0, method, 5, torch.float32, x)
        assert _rel(y32, newton_schulz(x, sched, torch.float32)) <= bound32, shape
        y16 = kernels.newton_schulz_triton(x, sched, torch.bfloat16)
        per_matrix = torch.stack(
            [newton_schulz(xi, sched, torch.bfloat16) for xi in x.reshape(-1, *shape[-2:])]
        )
        bound16 = 2**0.5 * tol.ns_error_rms(0.0, method, 5, torch.bfloat16, x)
        assert _rel(y16.reshape(per_matrix.shape), per_matrix) <= bound16, shape
    p = torch.randn(2, 300, 200, device="cuda", generator=g)
    out = torch.full((2, 300, 300), float("nan"), device="cuda")
    kernels.sym_matmul(p, out=out, block_m=128, block_k=64, mirror=False)
    lower = (
        torch.ones(3, 3, dtype=torch.bool)
        .tril()
        .repeat_interleave(128, 0)
        .repeat_interleave(128, 1)[:300, :300]
    )
    assert torch.isnan(out[:, ~lower]).all() and torch.isfinite(out[:, lower]).all()
    assert ((out[:, lower] - (p @ p.mT)[:, lower]).abs() <= tol.product_abs(p, p.mT)[:, lower]).all()


# ----------------------------------------------------------------------------- interpreted checks (worker)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _impl():
    return sys.modules["teonspeed.ortho.kernels.newton_schulz_triton"]


def _check_sym_matches_gram():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 24, generator=g)  # 3 row tiles of 16, the last one masked
    a = kernels.sym_matmul(x, block_m=16, block_k=16)
    assert ((a - x @ x.mT).abs() <= tol.product_abs(x, x.mT)).all()  # the same sums, blocked otherwise
    assert torch.equal(a, a.mT), "A must be exactly symmetric"
    xb = x.to(torch.bfloat16)
    ab = kernels.sym_matmul(xb, block_m=16, block_k=16)
    ref = (xb.float() @ xb.float().mT).to(torch.bfloat16)
    assert ab.dtype == torch.bfloat16 and torch.equal(ab, ab.mT)
    # both round an fp32 sum to bf16 once: the sums differ by √n·u₃₂, so an entry is at most one bf16 ulp off
    assert _rel(ab, ref) <= 2 * tol.u(torch.bfloat16)


def _check_sym_computes_lower_tiles_only():
    impl = _impl()
    launched = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launched.append(tuple(grid))
            return self.kernel[grid]

    real = impl._kernels
    sym, upd = real()
    impl._kernels = lambda: (Spy(sym), upd)
    try:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 40, 24, generator=g)
        out = torch.full((2, 40, 40), float("nan"))
        kernels.sym_matmul(x, out=out, block_m=16, block_k=16, mirror=False)
    finally:
        impl._kernels = real
    assert launched == [(6, 2)], launched  # 3·4/2 tile programs per matrix, one launch for the batch
    ref = x @ x.mT
    for i in range(3):
        for j in range(3):
            tile = out[:, 16 * i : 16 * (i + 1), 16 * j : 16 * (j + 1)]
            want = ref[:, 16 * i : 16 * (i + 1), 16 * j : 16 * (j + 1)]
            if i >= j:
                bound = tol.product_abs(x, x.mT)[:, 16 * i : 16 * (i + 1), 16 * j : 16 * (j + 1)]
                assert ((tile - want).abs() <= bound).all(), (i, j)
            else:
                assert torch.isnan(tile).all(), f"upper tile {(i, j)} was written"


def _check_sym_with_c_is_b_update():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 40, 56, generator=g) / 8
    a = x @ x.mT
    b, c = -4.775, 2.0315
    out = kernels.sym_matmul(a, alpha=c, c=a, beta=b, block_m=16, block_k=16)
    # the product's sums in another order, then c·P + b·A: two more roundings of each term
    bound = abs(c) * tol.product_abs(a, a) + 2 * tol.LAMBDA * tol.u() * (
        abs(c) * (a.abs() @ a.abs()) + abs(b) * a.abs()
    )
    assert ((out - (b * a + c * a @ a)).abs() <= bound).all()
    assert torch.equal(out, out.mT)


def _check_ns_update():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 56, generator=g)
    bm = torch.randn(2, 40, 40, generator=g)
    out = kernels.ns_update(bm, x, 3.4445, block_m=16, block_n=16, block_k=16)
    bound = tol.product_abs(bm, x) + 2 * tol.LAMBDA * tol.u() * (3.4445 * x.abs() + bm.abs() @ x.abs())
    assert ((out - (3.4445 * x + bm @ x)).abs() <= bound).all()


def _matches_torch(method: str, dtype: torch.dtype, shape):
    def check():
        g = torch.Generator().manual_seed(4)
        x = torch.randn(*shape, generator=g)
        sched = schedule_for(method, 5)
        y = kernels.newton_schulz_triton(x, sched, dtype)
        ref = newton_schulz(x, sched, dtype)
        assert y.shape == x.shape and y.dtype == dtype
        # two evaluations of the same iteration: each side's own rounding in `dtype` (√2 of one)
        own = tol.ns_error_rms(0.0, method, 5, dtype, x)
        if dtype == torch.float32:
            assert _rel(y, ref) <= 2**0.5 * own
            return
        # bf16: the kernels round A, B and X once each, like torch's 2-D path (addmm). Torch's batched
        # path rounds b·A and A·A separately, so compare batched inputs matrix by matrix with the 2-D
        # path, and check against the fp64 iteration that the kernels are within the bf16 iteration's
        # derived error (the input cast, u_bf16, grown by the spectrum, plus each step's rounding).
        per_matrix = torch.stack([newton_schulz(xi, sched, dtype) for xi in x.reshape(-1, *shape[-2:])])
        assert _rel(y.reshape(per_matrix.shape), per_matrix) <= 2**0.5 * own
        exact = newton_schulz(x.double(), sched, torch.float64)
        assert _rel(y, exact) <= tol.ns_error_rms(tol.u(dtype), method, 5, dtype, x)

    return check


def _check_small_blocks_multi_tile():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 40, 56, generator=g)  # 3 x 4 tiles of 16, both edges masked
    sched = schedule_for("polar_express", 5)
    small = kernels.Blocks(sym_m=16, sym_k=16, upd_m=16, upd_n=16, upd_k=16, num_warps=4, num_stages=2)
    y = kernels.newton_schulz_triton(x, sched, torch.float32, blocks=small)
    own = 2**0.5 * tol.ns_error_rms(0.0, sched, 5, torch.float32, x)
    assert _rel(y, newton_schulz(x, sched, torch.float32)) <= own
    yb = kernels.newton_schulz_triton(x, sched, torch.bfloat16, blocks=small)
    per_matrix = torch.stack([newton_schulz(xi, sched, torch.bfloat16) for xi in x])
    assert _rel(yb, per_matrix) <= 2**0.5 * tol.ns_error_rms(0.0, sched, 5, torch.bfloat16, x)


def _check_leading_dims_tall_and_zero():
    g = torch.Generator().manual_seed(6)
    sched = schedule_for("ns5", 5)
    for shape in ((2, 2, 16, 32), (2, 48, 16)):
        x = torch.randn(*shape, generator=g)
        y = kernels.newton_schulz_triton(x, sched, torch.float32)
        assert y.shape == x.shape
        bound = 2**0.5 * tol.ns_error_rms(0.0, sched, 5, torch.float32, x)
        assert _rel(y, newton_schulz(x, sched, torch.float32)) <= bound
    z = torch.zeros(2, 16, 32)
    z[1] = torch.randn(16, 32, generator=g)
    yz = kernels.newton_schulz_triton(z, sched, torch.bfloat16)
    assert torch.count_nonzero(yz[0]) == 0, "a zero matrix must stay zero"
    assert torch.isfinite(yz).all()


def _check_per_step_coefficients_and_margin():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 32, generator=g)
    custom = Schedule("custom", ((3.0, -3.2, 1.2), (2.0, -1.5, 0.5), (1.875, -1.25, 0.375)), 1.3)
    y = kernels.newton_schulz_triton(x, custom, torch.float32)
    own = 2**0.5 * tol.ns_error_rms(0.0, custom, 3, torch.float32, x)
    assert _rel(y, newton_schulz(x, custom, torch.float32)) <= own
    swapped = Schedule("swapped", tuple(reversed(custom.steps)), 1.3)
    # the steps in another order are another polynomial f₂: both outputs share x's singular vectors, so
    # they differ by max |f₁(σ) − f₂(σ)| over x's normalised singular values (spectral norm), less rounding
    sigmas = torch.linalg.svdvals(x.double()) / (torch.linalg.matrix_norm(x.double()) * 1.3)
    f = [tol._after(s.steps, sigmas)[0] for s in (custom, swapped)]
    apart = float((f[0] - f[1]).abs().max())
    y2 = kernels.newton_schulz_triton(x, swapped, torch.float32)
    assert torch.linalg.matrix_norm((y - y2).double(), ord=2) >= apart - 2 * own * float(y.double().norm())


def _check_fp64_delegates_and_available():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(16, 32, generator=g, dtype=torch.float64)
    sched = schedule_for("ns5", 5)
    assert torch.equal(
        kernels.newton_schulz_triton(x, sched, torch.float64), newton_schulz(x, sched, torch.float64)
    )
    assert kernels.triton_available(torch.zeros(2, 2)) and kernels.interpreter_ready()


class _Skip(Exception):
    pass


def _check_ns_backend_dispatch():
    """The ns_backend option (proposed hook in teonspeed.ortho / OptimizerConfig): skipped until it exists."""
    import teonspeed
    from teonspeed import ortho

    if not hasattr(ortho, "NS_BACKENDS"):
        raise _Skip("teonspeed.ortho has no NS_BACKENDS yet (the ns_backend dispatch hook is not merged)")
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 16, 32, generator=g)
    y = teonspeed.orthogonalize(x, "polar_express", backend="triton")
    dtype = tol.ns_dtype()  # ns_dtype "auto" on the CPU: fp32, or bf16 under TEONSPEED_CPU_BF16=1
    bound = 2**0.5 * tol.ns_error_rms(0.0, "polar_express", 5, dtype, x)
    assert _rel(y, teonspeed.orthogonalize(x, "polar_express", backend="torch")) <= bound
    # auto stays on torch for CPU tensors, even with the interpreter on.
    assert torch.equal(
        teonspeed.orthogonalize(x, "ns5", backend="auto"), teonspeed.orthogonalize(x, "ns5", backend="torch")
    )
    named = [
        (f"model.layers.{i}.self_attn.{t}_proj.weight", torch.randn(32, 32, generator=g))
        for i in range(2)
        for t in "qkv"
    ]
    steps = {}
    for backend in ("torch", "triton"):
        params = [(n, torch.nn.Parameter(w.clone())) for n, w in named]
        for _, p in params:
            p.grad = torch.ones_like(p) + 0.1 * p.detach()
        teonspeed.TEON(params, ns_backend=backend).step()
        steps[backend] = torch.cat([p.detach().flatten() for _, p in params])
    # one step of lr 0.02 (fan_ratio 1): the updates O (‖O‖_F ≤ √32 per 32×64 stack, 3 stacks) differ by
    # the two backends' iteration rounding on these nearly rank-one gradients (the worst direction's
    # growth, tol.ns_error); the weights round alike
    bound = 0.02 * 2**0.5 * tol.ns_error(0.0, "polar_express", 5, dtype, 64) * (3 * 32) ** 0.5
    assert float((steps["torch"] - steps["triton"]).norm()) <= bound


CHECKS: Dict[str, Callable[[], None]] = {
    "sym_matches_gram": _check_sym_matches_gram,
    "sym_computes_lower_tiles_only": _check_sym_computes_lower_tiles_only,
    "sym_with_c_is_b_update": _check_sym_with_c_is_b_update,
    "ns_update": _check_ns_update,
    "small_blocks_multi_tile": _check_small_blocks_multi_tile,
    "leading_dims_tall_and_zero": _check_leading_dims_tall_and_zero,
    "per_step_coefficients_and_margin": _check_per_step_coefficients_and_margin,
    "fp64_delegates_and_available": _check_fp64_delegates_and_available,
    "ns_backend_dispatch": _check_ns_backend_dispatch,
}
for _method in ("ns5", "polar_express"):
    for _dtype in (torch.float32, torch.bfloat16):
        for _shape in ((16, 32), (32, 16), (3, 16, 48)):
            _name = f"matches_torch[{_method}-{str(_dtype).split('.')[-1]}-{'x'.join(map(str, _shape))}]"
            CHECKS[_name] = _matches_torch(_method, _dtype, _shape)


def _worker(out_path: str) -> None:
    torch.manual_seed(0)
    results = {}
    for name, fn in CHECKS.items():
        t0 = time.perf_counter()
        try:
            fn()
            results[name] = {"ok": True, "s": time.perf_counter() - t0}
        except _Skip as why:
            results[name] = {"ok": True, "skipped": str(why), "s": time.perf_counter() - t0}
        except Exception:  # report every check, never stop at the first failure
            results[name] = {"ok": False, "s": time.perf_counter() - t0, "error": traceback.format_exc()}
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def interpreted_results():
    env = {**os.environ, "TRITON_INTERPRET": "1", "TORCHDYNAMO_DISABLE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        env["TRITON_CACHE_DIR"] = str(Path(tmp) / "triton_cache")
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", str(out)],
            capture_output=True,
            text=True,
            env=env,
            cwd=str(REPO),
            timeout=WORKER_TIMEOUT_S,
        )
        if proc.returncode != 0 or not out.exists():
            pytest.fail(
                "interpreter worker failed "
                f"(rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return json.loads(out.read_text())


@NEEDS_TRITON
@pytest.mark.parametrize("name", list(CHECKS))
def test_interpreted(name, interpreted_results):
    result = interpreted_results[name]
    if result.get("skipped"):
        pytest.skip(result["skipped"])
    assert result["ok"], f"{name} failed in the TRITON_INTERPRET=1 worker:\n{result.get('error')}"


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(sys.argv[sys.argv.index("--worker") + 1])
