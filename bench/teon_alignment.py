"""Does stacking help this model? Alignment of the TEON groups' momenta, per unfolding mode.

    .venv/bin/python bench/teon_alignment.py                 # tiny and small CPU LLaMA (~2 minutes)
    .venv/bin/python bench/teon_alignment.py --sizes tiny --steps 50

TEON orthogonalizes K same-type matrices of consecutive blocks as one unfolded matrix. For members
M¹…Mᴷ of shape (out, in) (PyTorch's nn.Linear layout):

- `teon_mode=1` concatenates along the input dim, Z = [M¹ | … | Mᴷ] (out × K·in). The members share Z's
  left (output-side) singular space, so ‖Z‖_op / max_k ‖Mᵏ‖_op reaches √K only when the members' top
  *output-side* singular vectors u₁ coincide; with unrelated u₁ it stays near 1.
- `teon_mode=2` stacks along the output dim, Z = [M¹; …; Mᴷ] (K·out × in): it gains when the top
  *input-side* singular vectors v₁ coincide.

This program trains a model briefly with Muon (every matrix on its own), then, for every TEON group of
`teon_k` members, reports |u₁·u₁′| and |v₁·v₁′| of consecutive members (a random pair of unit vectors
in d dims gives about √(2/(πd))) and the norm gain of each mode. A mode whose gain stays near 1 makes
TEON's stacked polar factor close to per-layer Muon at a 1/√K smaller step (algorithms.md §6).
`alignment_report(optimizer)` does the same for any trained teonspeed optimizer.
Results: bench/results/teon_alignment.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]


# -- the diagnostic: pure functions on tensors ------------------------------------------------------
def top_singular_vectors(m: torch.Tensor):
    """(u₁, σ₁, v₁) of a matrix, in fp64."""
    U, S, Vh = torch.linalg.svd(m.double(), full_matrices=False)
    return U[:, 0], S[0], Vh[0]


def group_alignment(members: Sequence[torch.Tensor]) -> Dict[str, float]:
    """Alignment of K same-shape (out, in) matrices and the operator-norm gain of each unfolding.

    out_align / in_align: mean |u₁·u₁′| / |v₁·v₁′| over consecutive members (1: the same direction).
    gain_mode1 / gain_mode2: ‖[M¹|…|Mᴷ]‖_op / max_k ‖Mᵏ‖_op and ‖[M¹;…;Mᴷ]‖_op / max_k ‖Mᵏ‖_op, in [1, √K].
    """
    if len(members) < 2 or any(m.shape != members[0].shape for m in members):
        raise ValueError(
            "group_alignment needs at least two members of one shape, got shapes "
            f"{[tuple(m.shape) for m in members]}"
        )
    tops = [top_singular_vectors(m) for m in members]
    pairs = list(zip(tops, tops[1:]))
    largest = max(float(s) for _, s, _ in tops)
    stacked = [torch.cat([m.double() for m in members], dim=d) for d in (1, 0)]
    gains = [float(torch.linalg.matrix_norm(z, ord=2)) / largest if largest > 0 else 1.0 for z in stacked]
    out_dim, in_dim = members[0].shape
    return {
        "out_align": sum(abs(float(a[0] @ b[0])) for a, b in pairs) / len(pairs),
        "in_align": sum(abs(float(a[2] @ b[2])) for a, b in pairs) / len(pairs),
        "gain_mode1": gains[0],
        "gain_mode2": gains[1],
        "random_out": math.sqrt(2 / (math.pi * out_dim)),
        "random_in": math.sqrt(2 / (math.pi * in_dim)),
    }


def alignment_report(optimizer, teon_k: int = 2, teon_types=None) -> List[Dict]:
    """group_alignment of the momentum buffers of a trained teonspeed optimizer (Muon, TEON or HTMuon),
    for the TEON groups that `teon_k` consecutive blocks of the stacked types would form."""
    from teonspeed.config import default
    from teonspeed.grouping import build_groups

    named = list(optimizer.parameters_by_name.items())
    types = teon_types if teon_types is not None else default("teon_types", "teon")
    grouping = build_groups(
        named,
        teon_k=teon_k,
        teon_mode=1,
        teon_types=types,
        full_shape=optimizer.parallel.full_shape,
        relocate=optimizer.parallel.relocate,
    )
    rows = []
    for g in grouping.groups:
        if not g.is_teon:
            continue
        params = [optimizer.parameters_by_name[m.name] for m in g.members]
        if any("momentum_buffer" not in optimizer.state[p] for p in params):
            continue
        members = [
            optimizer.matrix_of(optimizer.state[p]["momentum_buffer"], m) for p, m in zip(params, g.members)
        ]
        rows.append(
            {
                "type": g.members[0].layer.layer_type,
                "blocks": [m.layer.block for m in g.members],
                "shape": list(g.members[0].shape),
                **group_alignment(members),
            }
        )
    return rows


# -- training a CPU model to get realistic momenta --------------------------------------------------
SIZES = {"tiny": None, "small": "llama_small_cpu"}


def trained_muon(size: str, steps: int, lr: float, data_dir: Path):
    """The tiny / small CPU LLaMA of bench/convergence.py trained `steps` steps with teonspeed.Muon in
    this process (a world of one, no DeepSpeed, so the momenta stay per-parameter)."""
    sys.path.insert(0, str(REPO))
    from launch.data import indexed_data
    from launch.engines import forward_loss
    from launch.model import build_model
    from launch.rules import padded_vocab
    from launch.options import check
    from launch.train import init_parallel

    import teonspeed
    from teonspeed.patches import cpu_shims

    cpu_shims.apply()  # what launch.pretrain does under --device cpu
    argv = ["--steps", str(steps), "--data-dir", str(data_dir), "--zero-stage", "0"]
    if SIZES[size]:
        argv += ["--model-config", SIZES[size]]
    args = check(argv, 1)
    init_parallel(args)
    torch.manual_seed(args.seed)
    tok, batches, _ = indexed_data(args, 1, 0)
    model = build_model(args, padded_vocab(tok.vocab_size, 1))
    opt = teonspeed.Muon(model, lr=lr, adamw_lr=3e-3, weight_decay=0.01)
    warmup = min(20, steps // 5)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)))
    for _ in range(steps):
        loss = forward_loss(model, *batches.next())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
    return opt, loss.item()


def summarize(results: Dict) -> str:
    lines = []
    for size, data in results["sizes"].items():
        lines += [
            f"\n### {size} ({data['steps']} Muon steps, final train loss {data['final_train_loss']:.3f}, "
            f"K = {results['teon_k']})\n",
            "| group | shape (out, in) | out-side \\|u₁·u₁′\\| | in-side \\|v₁·v₁′\\| | gain mode 1 "
            "(cat along in) | gain mode 2 (cat along out) |",
            "|---|---|---|---|---|---|",
        ]
        for r in data["groups"]:
            lines.append(
                f"| {r['type']} blocks {r['blocks']} | {tuple(r['shape'])} | {r['out_align']:.2f} "
                f"(random {r['random_out']:.2f}) | {r['in_align']:.2f} (random {r['random_in']:.2f}) "
                f"| {r['gain_mode1']:.3f} | {r['gain_mode2']:.3f} |"
            )
        g = data["groups"]
        if g:
            mean = lambda key: sum(r[key] for r in g) / len(g)  # noqa: E731
            lines.append(
                f"| **mean** | | {mean('out_align'):.2f} | {mean('in_align'):.2f} | "
                f"{mean('gain_mode1'):.3f} | {mean('gain_mode2'):.3f} |"
            )
    lines.append(f"\nThe most a gain can be is √K = {math.sqrt(results['teon_k']):.3f}.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,small", help=f"comma-separated, of {sorted(SIZES)}")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.01, help="Muon's lr (the convergence study's best)")
    p.add_argument("--teon-k", type=int, default=2)
    p.add_argument("--data-dir", default=str(REPO / "data" / "embedded"))
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--stem", default="teon_alignment")
    args = p.parse_args()
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO / "bench"))
    from convergence import prepare_data

    data_dir = Path(args.data_dir)
    prepare_data(data_dir)
    results: Dict = {"teon_k": args.teon_k, "lr": args.lr, "sizes": {}}
    start = time.perf_counter()
    for size in args.sizes.split(","):
        import torch.distributed as dist

        from megatron.core import parallel_state

        opt, loss = trained_muon(size, args.steps, args.lr, data_dir)
        results["sizes"][size] = {
            "steps": args.steps,
            "final_train_loss": loss,
            "groups": alignment_report(opt, args.teon_k),
        }
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    results["machine"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(json.dumps(results, indent=1))
    table = summarize(results)
    (out / f"{args.stem}.md").write_text(
        f"# TEON alignment diagnostic\n\n{results['machine']['platform']}, "
        f"Python {results['machine']['python']}, "
        f"torch {results['machine']['torch']}; `bench/teon_alignment.py --steps {args.steps} "
        f"--lr {args.lr}`.\n"
        "Momentum buffers (EMA, β = 0.95) of the Q/K/V matrices after Muon training, PyTorch (out, "
        f"in) layout.\n{table}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
