"""The tables and the plot of bench/convergence.py's results (pure formatting of its JSON)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Dict, List, Optional

# The seed paper (arXiv 2509.24406, algorithms.md §7): Muon reaches AdamW's target loss with 48-52% of the
# training; MLA+MoE+Muon has 8-12% lower perplexity than (presumably) a dense MHA model with AdamW.
PAPER_STEP_FRACTION = (0.48, 0.52)
PAPER_PPL_GAIN_PCT = (8.0, 12.0)
TOKENS_PER_STEP = 32 * 64  # launch/pretrain.py's default global batch x the tiny models' sequence


def _final(record: Dict) -> float:
    return record["val_curve"][-1][1] if record["val_curve"] else math.inf


def _mean_sd(values: List[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def _steps(values: List[Optional[float]]) -> str:
    return ", ".join("not reached" if s is None else f"{s:.0f}" for s in values)


def _fractions(values: List[Optional[float]]) -> str:
    return ", ".join("–" if f is None else f"{100 * f:.0f}%" for f in values)


def bracketed(row: Dict) -> bool:
    """Whether the row's best setting has a run on both sides of it along each swept axis."""
    best = (row["best_lr"], row["best_adamw_lr"])
    lrs = [r["lr"] for r in row["sweep"] if r["adamw_lr"] == best[1]]
    parts = [r["adamw_lr"] for r in row["sweep"] if r["lr"] == best[0]]
    inside = lambda xs, x: min(xs) < x < max(xs)  # noqa: E731
    return inside(lrs, best[0]) and (best[1] is None or inside(parts, best[1]))


def headline(name: str, model: Dict) -> List[str]:
    n = len(model["seeds_used"])
    lines = [
        f"\n### {name}: {model['what']} ({model['steps']} "
        f"steps, {model['steps'] * TOKENS_PER_STEP / 1e6:.2f}M "
        f"tokens, 2 ranks, seeds {model['seeds_used']})\n",
        f"| optimizer | best lr | AdamW part's lr | final val loss (mean ± sd, {n} seeds) | perplexity "
        "| − AdamW, "
        "paired (mean ± sd) | t | perplexity vs AdamW | steps to AdamW's final loss (per seed) | as a "
        "share of AdamW's steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for opt, row in model["rows"].items():
        finals = [_final(r) for r in row["seeds"]]
        part = f"{row['best_adamw_lr']:g}" if row["best_adamw_lr"] is not None else "–"
        if not bracketed(row):
            part += " (grid edge)"
        if not all(math.isfinite(f) for f in finals):
            lines.append(f"| {opt} | {row['best_lr']:g} | {part} | failed | | | | | | |")
            continue
        v = model.get("versus_adamw", {}).get(opt)
        cmp = (
            (
                f"{v['mean']:+.4f} ± {v['sd']:.4f} | {v['t']:.1f} | {v['ppl_pct_mean']:+.1f}% | "
                f"{_steps(v['steps_to_target'])} | {_fractions(v['fraction_of_steps'])}"
            )
            if v
            else "– | – | – | – | –"
        )
        lines.append(
            f"| {opt} | {row['best_lr']:g} | {part} | {_mean_sd(finals)} | "
            f"{math.exp(statistics.mean(finals)):.2f} | {cmp} |"
        )
    if model.get("versus_muon"):
        lines += [
            "\nAgainst Muon, paired by seed (each at its best setting): "
            + "; ".join(
                f"{opt} − muon {v['mean']:+.4f} ± {v['sd']:.4f} (t = {v['t']:.1f}, "
                f"perplexity {v['ppl_pct_mean']:+.1f}%)"
                for opt, v in model["versus_muon"].items()
            )
        ]
    return lines


def sweeps(name: str, model: Dict) -> List[str]:
    lines = [
        f"\n#### {name}: the sweeps (final validation loss, seed {model['seeds_used'][0]}; best in bold)\n"
    ]
    for opt, row in model["rows"].items():
        runs = row["sweep"]
        best = min(runs, key=lambda r: _final(r) if math.isfinite(_final(r)) else math.inf)
        cell = lambda r: (
            ("**{:.4f}**" if r is best else "{:.4f}").format(_final(r)) if r["val_curve"] else "failed"
        )  # noqa: E731
        if opt == "adamw":
            lines.append("AdamW, lr: " + ", ".join(f"{r['lr']:g}: {cell(r)}" for r in runs) + "\n")
            continue
        lrs = sorted({r["lr"] for r in runs})
        parts = sorted({r["adamw_lr"] for r in runs})
        at = {(r["lr"], r["adamw_lr"]): r for r in runs}
        lines += [
            f"{opt}: lr (rows) x the AdamW part's lr (columns)\n",
            "| lr | " + " | ".join(f"adamw_lr {a:g}" for a in parts) + " |",
            "|---|" + "---|" * len(parts),
        ]
        lines += [
            f"| {lr:g} | " + " | ".join(cell(at[lr, a]) if (lr, a) in at else "" for a in parts) + " |"
            for lr in lrs
        ]
        lines.append("")
    if model.get("teon_k"):
        lines += [
            "TEON's group size K at TEON's best setting (K = 1 is Muon with TEON's orthogonalizer and "
            "scaling): "
            + ", ".join(
                f"K = {k}: " + (f"{_final(r):.4f}" if r["val_curve"] else "failed")
                for k, r in sorted(model["teon_k"].items(), key=lambda kr: int(kr[0]))
            ),
            "",
        ]
    return lines


def _verdict_ppl(pct: float) -> str:
    gain = -pct
    lo, hi = PAPER_PPL_GAIN_PCT
    if gain >= lo:
        return "within or beyond the paper's 8–12%" if gain <= hi else "more than the paper's 8–12%"
    return "less than the paper's 8–12%" if gain > 0 else "no gain (the paper: 8–12% lower)"


def seed_paper_lines(paper: Dict) -> List[str]:
    lines = [
        "\n## The seed paper's claims on CPU (arXiv 2509.24406: Muon with MLA and MoE)\n",
        "The paper: Muon reaches AdamW's target loss with 48–52% of AdamW's training, and MLA+MoE+Muon has "
        "8–12% lower perplexity than its baseline (presumably a dense MHA model with AdamW). Measured "
        "here on "
        "the tiny models at equal tokens, each side at its own tuned learning rates, paired by seed:\n",
        "| comparison | − baseline, paired (mean ± sd) | t | perplexity vs baseline (per seed) | steps "
        "to the baseline's final loss | share of its steps | reading |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {
        "muon_vs_adamw_on_mla_moe": "Muon − AdamW, both on mla_moe_tiny",
        "mla_moe_muon_vs_dense_mha_adamw": "mla_moe_tiny + Muon − dense_mha_tiny + AdamW",
        "mla_moe_adamw_vs_dense_mha_adamw": "mla_moe_tiny + AdamW − dense_mha_tiny + AdamW "
        "(architecture only)",
    }
    for key, v in paper.items():
        reached = [f for f in v["fraction_of_steps"] if f is not None]
        share = (
            f"mean {100 * statistics.mean(reached):.0f}% of the steps ({len(reached)}/{len(v['seeds'])} "
            "seeds reach it)"
            if reached
            else "not reached"
        )
        lines.append(
            f"| {names.get(key, key)} | {v['mean']:+.4f} ± {v['sd']:.4f} | {v['t']:.1f} | "
            f"{', '.join(f'{p:+.1f}%' for p in v['ppl_pct'])} (mean {v['ppl_pct_mean']:+.1f}%) | "
            f"{_steps(v['steps_to_target'])} | {_fractions(v['fraction_of_steps'])} | "
            f"{_verdict_ppl(v['ppl_pct_mean'])}; {share} (paper: 48–52%) |"
        )
    return lines


GPU_TEXT = """
## What a GPU run would add (`bench/convergence.py --gpu`)

The CPU models are tiny (~0.3M parameters a rank, 0.4M tokens a run): the AdamW part (embeddings, head,
norms, router) is about 40% of the parameters, so its lr decides much of every comparison, and 200 steps
is a short horizon. `python3 bench/convergence.py --gpu [--arm NAME]` (bench/gpu_preset.py) trains a
LLaMA-60M (the HTMuon authors' shape) on >= 100M tokens built offline, one arm per 10-minute command:
`adamw` (lr 1e-3), `muon` (0.01), `teon_mode1` and `teon_mode2` (0.01·√2) and `htmuon` (0.03), every
orthogonalizing arm's AdamW part at 1e-3 (AdamW's lr: by the sweeps here it should be swept too, up to ~4x),
weight decay 0.1, batch 131k tokens. It adds the regime the
papers report (embeddings a small share, ~80M tokens per arm), so it tests whether the orderings measured
here survive scale. It does not test the MLA+MoE claim: the GPU preset is a dense LLaMA. That needs
`launch/pretrain.py --device cuda` with an MLA+MoE model config at 60M+ and a dense MHA one of equal
active parameters, both swept like the tables above (not run: no GPU was available to this study).
"""


def machine_line(m: Dict) -> str:
    """One invocation of a study: which models it trained, on what, and how busy the machine was."""
    models = f"{', '.join(m['trained'])}: " if m.get("trained") else ""
    during = m.get("load_average_during")
    load = (
        f"load average {during['mean']:.1f} (min {during['min']:.1f}, max {during['max']:.1f}) while it "
        f"trained, {m.get('load_average_at_end', float('nan')):.1f} at the end"
        if during
        else f"load average {m.get('load_average_at_end', float('nan')):.1f} at the end"
    )
    return (
        f"{models}{m.get('cpu', 'CPU not recorded')}, {m.get('cpus', '?')} cores shared with other jobs "
        f"({load}); torch {m.get('torch', 'not recorded')}, Python {m.get('python', '?')}, "
        f"{m.get('platform', '?')}; {m.get('date', '?')}; wall time {m.get('wall_seconds', 0):.0f} s; "
        f"orthogonalizer in {m.get('orthogonalizer_dtype', '?')}."
    )


def summarize(results: Dict, quick: bool = False) -> str:
    m = results.get("machine", {})
    pending = results.get("pending") or []
    title = "# Convergence study" + (" (quick)" if quick else "") + (" — PARTIAL" if pending else "")
    machines = results.get("machines") or [m]
    lines = [
        title,
        "",
        "Measured by " + ("one invocation" if len(machines) == 1 else f"{len(machines)} invocations") + ":",
        *[f"- {machine_line(x)}" for x in machines],
        "",
        "Every run: launch/pretrain.py on 2 processes (data parallel), "
        "the embedded corpus as Megatron indexed datasets, equal tokens per optimizer (global batch 32 x 64 "
        "tokens), linear warmup then cosine to 0.1x, weight decay 0.01, clipping 1.0. The losses do not "
        "depend on the load (fp32 orthogonalizer: no timing probe picks the arithmetic); the wall times do.",
    ]
    if pending:
        lines.append(
            f"\n**Partial:** not yet run: {', '.join(pending)}. To finish: `python bench/convergence.py` "
            "(every model; the finished runs, the pending models' included, are reused from "
            "bench/results/convergence.json, so only the missing ones train)."
        )
    p = results.get("protocol", {})
    if p:
        lines.append(
            f"\nProtocol: AdamW's lr swept from {list(p['adamw_grid'])}; every orthogonalizing optimizer "
            f"sweeps its matrices' lr (Muon {list(p['matrix_lr_grid']['muon'])}, TEON "
            f"{list(p['matrix_lr_grid']['teon'])}, HTMuon: Muon's best and {p['htmuon_ratio']:g}x it) "
            f"jointly with its AdamW part's lr (AdamW's best x {list(p['adamw_part_factors'])}); every axis "
            "is extended through the best cell until that cell has a worse neighbour on both sides (at most "
            f"{p.get('joint_sweep_rounds', 3)} rounds of extension: a best cell still on an edge of its "
            'sweep is marked "grid edge"); the '
            "best setting of every row is re-run with every seed. Differences are paired by seed "
            "(t = mean / (sd/√n)); \"steps to AdamW's final loss\" is per seed, against AdamW's run of "
            "the same seed (linear interpolation between evaluations every 20 steps)."
        )
    for name, model in results["models"].items():
        lines += headline(name, model)
    if results.get("seed_paper"):
        lines += seed_paper_lines(results["seed_paper"])
    lines.append("\n## Sweeps")
    for name, model in results["models"].items():
        lines += sweeps(name, model)
    lines.append(GPU_TEXT)
    return "\n".join(lines) + "\n"


def summarize_teon(study_result: Dict, quick: bool = False) -> str:
    """The TEON study's markdown: the machine, the AdamW part every arm shares, the arms and the pairs."""
    r = study_result
    n = len(r["seeds_used"])
    lines = [
        f"# TEON study{' (quick)' if quick else ''}\n",
        "Measured by:",
        *[f"- {machine_line(m)}" for m in (r.get("machines") or [r.get("machine", {})])],
        "\nEvery run: launch/pretrain.py on 2 processes (data parallel), the embedded corpus, equal tokens "
        "(32 x 64 tokens a step), linear warmup then cosine to 0.1x, weight decay 0.01, clipping 1.0. Every "
        f"arm's AdamW part (embeddings, head, norms) at lr {r.get('adamw_lr', 3e-3):g}: "
        f"{r.get('adamw_lr_source', 'not recorded')}, so the arms differ only in their matrix optimizer. "
        "(Before issue 24 it was 0.003 for every arm, ~4x below its best on these models; those numbers "
        "are replaced by these.)",
        f"\n### TEON study: {r['size']} ({r['model_config']}, {r['steps']} steps, 2 ranks, "
        f"seeds {r['seeds_used']})\n",
        f"| arm | what | best lr | final val loss (mean ± std, {n} seeds) | lr sweep "
        f"(seed {r['seeds_used'][0]}) |",
        "|---|---|---|---|---|",
    ]
    for name, arm in r["arms"].items():
        finals = [_final(x) for x in arm["seeds"]]
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        sweep = ", ".join(
            f"{x['lr']:.4g}: {x['val_curve'][-1][1]:.4f}" if x["val_curve"] else f"{x['lr']:.4g}: failed"
            for x in arm["sweep"]
        )
        lrs = [x["lr"] for x in arm["sweep"]]
        edge = " (grid edge)" if len(lrs) > 2 and arm["best_lr"] in (min(lrs), max(lrs)) else ""
        lines.append(
            f"| {name} | {arm['what']} | {arm['best_lr']:.4g}{edge} | {statistics.mean(finals):.4f} "
            f"± {std:.4f} | {sweep} |"
        )
    if r.get("pairs"):
        lines += [
            "\nPaired by seed, each arm at its own best lr (difference of final validation loss; negative: "
            "the first arm is better; t = mean / (sd/√n)):\n",
            "| comparison | per-seed differences | mean ± sd | t |",
            "|---|---|---|---|",
        ]
        for name, p in r["pairs"].items():
            diffs = ", ".join(f"{d:+.4f}" for d in p["diffs"])
            lines.append(f"| {name} | {diffs} | {p['mean']:+.4f} ± {p['sd']:.4f} | {p['t']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: Dict, path: Path) -> None:
    """Validation loss of every optimizer's best setting (first seed), one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"].items())
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, (name, model) in zip(axes[0], models):
        for opt, row in model["rows"].items():
            run = row["seeds"][0]
            if run["val_curve"]:
                steps, vals = zip(*run["val_curve"][1:])  # (step 0 is the same for every optimizer)
                part = f", AdamW part {row['best_adamw_lr']:g}" if row["best_adamw_lr"] is not None else ""
                ax.plot(steps, vals, "o-", ms=3, label=f"{opt} (lr {run['lr']:g}{part})")
        ax.set_title(f"{name}: validation loss, best setting")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
