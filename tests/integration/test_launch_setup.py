"""The launcher's setup, checked before anything runs: every model config builds at the layouts a user
would pick (megatron-core on the meta device, one fake-process-group rank), one validator for
launch/pretrain.py, the SLURM dry-run and launch/memory.py, readable one-line errors, unique run
directories, one lr schedule for both backends, a global batch fixed across layouts, and imports
that run one way."""

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launch import configs, options
from launch.schedule import lr_factor

REPO = Path(__file__).resolve().parents[2]
MODELS = sorted(p.stem for p in configs.MODELS_DIR.glob("*.yaml"))
LAYOUTS = sorted(configs.LAYOUTS_DIR.glob("*.yaml"))
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# (the caller's PYTHONPATH kept, like the other subprocess tests: the teonspeed under test, not another
# install)
ENV = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    PYTHONWARNINGS="default",
)


def divisors(n, upto):
    return [d for d in range(1, upto + 1) if n % d == 0]


def user_layouts(name):
    """(tp, pp, ep) a user would pick: TP 1/2/4/8 where the heads and groups allow (TP 1 for MoE, whose
    TP needs sequence parallelism), PP 1/2/4 leaving whole TEON pairs per stage, EP up to 8 dividing the
    experts."""
    t = configs.load_model_config(name)["transformer"]
    heads, groups = t["num_attention_heads"], t.get("num_query_groups") or t["num_attention_heads"]
    experts = t.get("num_moe_experts")
    tps = [1] if experts else [tp for tp in (1, 2, 4, 8) if heads % tp == 0 and groups % tp == 0]
    pps = [pp for pp in (1, 2, 4) if t["num_layers"] % (2 * pp) == 0]
    eps = divisors(experts, 8) if experts else [1]
    return [(tp, pp, ep) for tp in tps for pp in pps for ep in eps]


def launch_argv(config, tp, pp, ep):
    return [
        "--model-config",
        str(config),
        "--device",
        "cuda",
        "--tp",
        str(tp),
        "--pp",
        str(pp),
        "--ep",
        str(ep),
        "--runs-dir",
        "/nonexistent-runs",
    ]


@pytest.mark.parametrize("name", MODELS)
def test_every_config_passes_the_validator_at_every_user_layout(name):
    for tp, pp, ep in user_layouts(name):
        args = options.check(launch_argv(name, tp, pp, ep), tp * pp * ep)
        assert args.dp == ep


def _meta_build(config, tp, pp, ep):
    """Build rank 0's part of the model for this layout on the meta device (no memory, no real ranks)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from launch.model import build_model
    from launch.rules import padded_vocab
    from teonspeed.patches import cpu_shims

    cpu_shims.apply()
    # The all-to-all dispatcher (moe_small) makes a CUDA stream at build time, used only when it runs on a
    # GPU.
    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = MoEAlltoAllTokenDispatcher.cuda_dtoh_stream or object()
    args = options.check(launch_argv(config, tp, pp, ep), tp * pp * ep)
    args.device = "cpu"  # (the build itself: CPU initialization, on the meta device)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp * pp * ep)
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            create_gloo_process_groups=False,
        )
        with torch.device("meta"):
            model = build_model(args, padded_vocab(args.vocab, tp))
        return sum(p.numel() for p in model.parameters())
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def build_matrix():
    """Per config its strictest layouts (largest TP; largest PP; largest EP) plus every layout the README,
    docs/ and configs/models/layouts/ name."""
    cases = set()
    for name in MODELS:
        layouts = user_layouts(name)
        cases.add((name, *max(layouts)))  # largest TP (then PP, EP)
        cases.add((name, *max(layouts, key=lambda x: (x[1], x[0], x[2]))))  # largest PP
        cases.add((name, *max(layouts, key=lambda x: (x[2], x[0], x[1]))))  # largest EP
    for path in LAYOUTS:
        raw = configs.read_yaml(path)
        par = raw["parallel"]
        cases.add((path.stem, par.get("tp", 1), par.get("pp", 1), par.get("ep", 1)))
    for doc in DOCS:
        for config, tp, pp in re.findall(r"--model-config (\S+)\s+--tp (\d+)\s+--pp (\d+)", doc_text(doc)):
            cases.add((config, int(tp), int(pp), 1))
    return sorted(cases)


def doc_text(path: Path) -> str:
    """A markdown file with list items' continuation lines joined (commands in backticks span lines)."""
    return re.sub(r"\n {2,}(?=\S)", " ", path.read_text())


@pytest.mark.parametrize("config,tp,pp,ep", build_matrix())
def test_every_config_builds_at_its_layouts_on_the_meta_device(config, tp, pp, ep):
    assert _meta_build(config, tp, pp, ep) > 0


def test_the_validator_catches_what_megatron_refuses(tmp_path):
    """The papers' LLaMA-1B FFN (5461) at TP 2: refused by the validator, as Megatron would (checked too)."""
    cfg = configs.read_yaml(configs.MODELS_DIR / "llama_1b.yaml")
    cfg["transformer"]["ffn_hidden_size"] = 5461
    import yaml

    (tmp_path / "paper_1b.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit, match=r"--tp 2 does not divide ffn_hidden_size=5461"):
        options.check(launch_argv(tmp_path / "paper_1b.yaml", 2, 1, 1), 2)
    args = options.parse_args(launch_argv(tmp_path / "paper_1b.yaml", 2, 1, 1))
    args.device = "cpu"
    with pytest.raises(Exception, match="5461 is not divisible by 2"):
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state
        from torch.testing._internal.distributed.fake_pg import FakeStore

        from launch.model import build_model

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
        try:
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=2, create_gloo_process_groups=False
            )
            with torch.device("meta"):
                build_model(args, 32768)
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


# --- the SLURM walkthrough's steps (docs/launch.md), verbatim, under --dry-run with fake SLURM variables ---
def fake_data_dir(root: Path, name: str) -> None:
    data = root / name
    data.mkdir(parents=True)
    for f in ("train.bin", "train.idx", "valid.bin", "valid.idx"):
        (data / f).write_bytes(b"")
    (data / "tokenizer.json").write_text(
        json.dumps({"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": []})
    )


def walkthrough_commands() -> list:
    section = (
        doc_text(REPO / "docs" / "launch.md").split("## A multi-node run under SLURM")[1].split("\n## ")[0]
    )
    starts = (".venv/bin/python -m launch", "sbatch ")
    return [c for c in re.findall(r"`([^`]+)`", section) if c.startswith(starts)]


def write_text_corpus(root: Path) -> None:
    """A user's own text, where step 2 says it is: a few .txt and .jsonl documents per split."""
    words = "the quick brown fox jumps over the lazy dog while a parallel optimizer orthogonalizes".split()
    for split, n in (("train", 12), ("valid", 3)):
        folder = root / "my_corpus" / split
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"doc{i}.txt").write_text(" ".join(words[i % 5 :] + words[: i % 5]) * 3 + "\n")
        (folder / "more.jsonl").write_text(json.dumps({"text": " ".join(reversed(words))}) + "\n")


@pytest.mark.parametrize("source", ["--input", "--embedded"])
def test_slurm_walkthrough_steps_2_to_4_run_verbatim_on_one_data_directory(
    source, tmp_path, monkeypatch, capsys
):
    """Step 2 (either way of preparing the data) writes the directory that steps 4 and 5 read; nothing is
    faked but the SLURM allocation (its variables) and the user's text."""
    from launch import memory, prepare_data
    from launch.slurm import launch as slurm

    commands = walkthrough_commands()
    prepare = [c for c in commands if "launch.prepare_data" in c and source in c.split()]
    memory_cmds = [c for c in commands if "launch.memory" in c]
    dry_runs = [c for c in commands if "launch.slurm.launch --dry-run" in c]
    sbatch = [c for c in commands if c.startswith("sbatch ") and "pretrain.sbatch" in c]
    assert prepare and memory_cmds and dry_runs and sbatch, commands
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # "every core but one": one encoding process here
    write_text_corpus(tmp_path)
    for cmd in prepare:  # step 2
        prepare_data.main(shlex.split(cmd)[3:] + ["--no-progress"])
    for cmd in memory_cmds:  # step 3
        assert memory.main(shlex.split(cmd)[3:]) == 0
    nodes = 2
    env = dict(
        SLURM_JOB_NODELIST="gpu[01-02]",
        SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_NODEID="0",
        SLURM_GPUS_ON_NODE="8",
        SLURM_JOB_ID="4242",
    )
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for cmd in dry_runs:  # step 4
        assert slurm.main(shlex.split(cmd)[3:]) == 0
    for cmd in sbatch:  # step 5, checked the same way
        argv = shlex.split(cmd)
        script_args = argv[argv.index("launch/slurm/pretrain.sbatch") + 1 :]
        assert f"--nodes={nodes}" in argv
        assert slurm.main(["--dry-run", "--", *script_args]) == 0
    out = capsys.readouterr().out
    assert "2 nodes x 8 processes = world 16" in out and "warning" not in out
    data_dirs = {a for c in dry_runs + sbatch for a in shlex.split(c) if a.startswith("data/")}
    assert data_dirs == {"data/mycorpus"} and (tmp_path / "data" / "mycorpus" / "tokenizer.json").is_file()


def test_dry_run_without_slurm_variables_refuses(monkeypatch):
    from launch.slurm import launch as slurm

    for var in ("SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit, match=r"--dry-run: no SLURM allocation in the environment"):
        slurm.main(["--dry-run", "--", "--tp", "2"])


def test_dry_run_checks_the_run_for_the_allocation(monkeypatch):
    from launch.slurm import launch as slurm

    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-02]")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    with pytest.raises(SystemExit, match=r"--tp 3 x --pp 1 x --ep 1 = 3 does not divide the world size 16"):
        slurm.main(["--dry-run", "--", "--model-config", "llama_1b", "--tp", "3", "--device", "cuda"])
    with pytest.raises(SystemExit, match=r"no such config; known: .*llama_1b"):
        slurm.main(["--dry-run", "--", "--model-config", "llama_7b"])
    with pytest.raises(SystemExit, match=r"--data-dir data/nope does not exist"):
        slurm.main(["--dry-run", "--", "--data-dir", "data/nope"])


def test_memory_uses_the_launchers_validator_and_honours_every_flag():
    from launch import estimator, memory

    def total(argv):
        spec, par, train = estimator.setup_from_launch(argv, 8)
        return estimator.estimate(spec, par, train)

    with pytest.raises(SystemExit, match=r"--zero-stage 1 is DeepSpeed's: the Megatron backend"):
        memory.main(["llama_1b_tp2_pp2", "--zero-stage", "1"])
    with pytest.raises(SystemExit, match=r"--tp 3 must divide the attention heads \(32\)"):
        memory.main(["llama_1b", "--tp", "3", "--dp", "8"])
    layout = configs.read_yaml(configs.LAYOUTS_DIR / "llama_1b_dp8.yaml")
    argv, world = estimator.layout_argv(layout, configs.LAYOUTS_DIR / "llama_1b_dp8.yaml")
    zero1 = total(argv)
    zero0 = total(argv + ["--zero-stage", "0"])
    assert zero1.training["zero_stage"] == 1 and zero0.training["zero_stage"] == 0
    assert zero0.bytes["optimizer_states"] == 8 * zero1.bytes["optimizer_states"]  # ZeRO-1 shards over DP 8
    pp2_argv = estimator.layout_argv(configs.read_yaml(LAYOUTS[2]), LAYOUTS[2])[0]
    pp2 = estimator.setup_from_launch(pp2_argv, 16)[2]
    assert LAYOUTS[2].stem == "llama_1b_tp2_pp2" and pp2.zero_stage == 0  # Megatron backend: no ZeRO
    assert estimator.setup_from_launch(pp2_argv + ["--distributed-optimizer"], 16)[2].zero_stage == 1


# --- readable errors ---------------------------------------------------------------------------------------
def run_module(*argv, env=None):
    return subprocess.run(
        [sys.executable, *argv], cwd=REPO, env=env or ENV, capture_output=True, text=True, timeout=60
    )


def test_a_bad_setup_is_one_line_before_any_heavy_import():
    proc = run_module(
        "-c",
        "import sys\nfrom launch.pretrain import main\ntry:\n    main(['--tp', '3'])\n"
        "except SystemExit as e:\n    print(e.code)\nprint(sorted(m for m in ('torch', 'megatron', "
        "'deepspeed') if m in sys.modules))",
        env=dict(ENV, WORLD_SIZE="2"),
    )
    assert proc.stdout.splitlines() == [
        "error: the parallel layout --tp 3 x --pp 1 x --ep 1 = 3 does not divide the "
        "world size 2 (processes); choose sizes whose product divides 2",
        "[]",
    ]
    proc = run_module("-m", "launch.pretrain", "--tp", "3", env=dict(ENV, WORLD_SIZE="2", RANK="1"))
    assert proc.returncode == 2 and proc.stderr == ""  # rank 1 is silent: the message comes once, from rank 0
    proc = run_module("-m", "launch.pretrain", "--tp", "3", env=dict(ENV, WORLD_SIZE="2", RANK="0"))
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr


def test_help_is_plain_and_imports_nothing_heavy():
    proc = run_module("-m", "launch.pretrain", "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: python -m launch.pretrain") and "--global-batch" in proc.stdout
    assert "shim" not in proc.stdout and "Megatron asks" not in proc.stdout


def test_unknown_deepspeed_optimizer_type_lists_ours(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"optimizer": {"type": "TeonMuon", "params": {}}}))
    with pytest.raises(
        SystemExit,
        match=r"unknown optimizer type 'TeonMuon'; teonspeed's are TEON, TeonspeedMuon, "
        r"TeonspeedHTMuon",
    ):
        options.check(["--ds-config", str(tmp_path / "ds.json")], 2)


def test_deepspeed_builtin_types_match_deepspeed():
    from deepspeed.runtime import config as ds_config

    assert set(ds_config.DEEPSPEED_OPTIMIZERS) <= {t.lower() for t in options.DEEPSPEED_TYPES}


# --- run directories ---------------------------------------------------------------------------------------
def test_run_directories_are_never_reused_silently(tmp_path):
    def name(*argv):
        return options.check(["--runs-dir", str(tmp_path), *argv], 2).name

    assert name() == "teon_tp1"
    (tmp_path / "teon_tp1").mkdir()
    (tmp_path / "teon_tp1" / "metrics.csv").write_text("step\n")
    assert name() == "teon_tp1-2" and name("--tp", "2") == "teon_tp2"
    assert name("--resume") == "teon_tp1"  # the newest existing one of the series
    (tmp_path / "teon_tp1-2").mkdir()
    os.utime(tmp_path / "teon_tp1-2", (1e10, 1e10))
    assert name() == "teon_tp1-3" and name("--resume") == "teon_tp1-2"
    with pytest.raises(
        SystemExit,
        match=r"run directory .*teon_tp1 exists; pass --resume to continue it, "
        r"--overwrite to replace it, or another --name",
    ):
        name("--name", "teon_tp1")
    assert name("--name", "teon_tp1", "--overwrite") == name("--name", "teon_tp1", "--resume") == "teon_tp1"


# --- lr schedule -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps,warmup", [(10, 3), (20, 0), (5, 5), (200, 20)])
def test_both_backends_schedule_the_same_lr_sequence(steps, warmup):
    """The lr each step runs at, from the schedulers the two backends build, on a stand-in optimizer."""
    import torch

    from launch.schedule import deepspeed_scheduler, megatron_scheduler

    args = options.check(["--steps", str(steps), "--warmup", str(warmup), "--lr", "0.5"], 1)
    expected = [0.5 * lr_factor(i, warmup, steps, 0.1) for i in range(steps)]
    sequences = []
    # (DeepSpeed's engine calls scheduler.step() after each optimizer step; launch/engines.py's Megatron
    # backend calls step(increment=1).)
    for make, advance in (
        (deepspeed_scheduler(args), lambda s: s.step()),
        (lambda opt: megatron_scheduler(opt, args, 0.5), lambda s: s.step(increment=1)),
    ):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        sched, lrs = make(opt), []
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            advance(sched)
        sequences.append(lrs)
    assert sequences[0] == pytest.approx(expected, rel=1e-12) and sequences[1] == pytest.approx(
        expected, rel=1e-12
    )
    assert min(expected) > 0
    assert expected[-1] == pytest.approx(
        0.05 if warmup < steps else 0.5
    )  # (a warmup as long as the run: warned)
    if warmup:
        assert expected[warmup - 1] == pytest.approx(0.5) and expected[0] == pytest.approx(0.5 / warmup)


def test_schedule_follows_steps_and_warns_when_a_config_does_not_fit():
    assert options.check(["--steps", "30"], 1).warmup == 3  # --steps / 10 unless --warmup
    assert options.check(["--steps", "30", "--warmup", "7"], 1).warmup == 7
    ds = str(REPO / "configs" / "deepspeed" / "teon_zero2_bf16.json")  # warmup 500, total 10000
    args = options.check(["--ds-config", ds, "--steps", "20"], 1)
    assert args.warmup == 2
    assert any("warmup_num_steps=500 does not fit --steps 20" in n for n in args.notes)
    assert any("total_num_steps=10000 differs from --steps 20" in n for n in args.notes)
    assert options.check(["--ds-config", ds, "--steps", "1000"], 1).warmup == 500  # fits: kept


# --- global batch ------------------------------------------------------------------------------------------
def test_the_global_batch_in_tokens_is_the_same_at_every_layout():
    layouts = [[], ["--tp", "2"], ["--pp", "2"], ["--grad-accum", "2"], ["--tp", "2", "--grad-accum", "4"]]
    tokens = set()
    for extra in layouts:
        args = options.check(extra, 2)
        assert args.micro_batch * args.dp * args.grad_accum == args.global_batch == 32
        tokens.add(args.global_batch * args.seq)
        assert f"{args.global_batch * args.seq} tokens/step" in options.summary(args)
    assert tokens == {2048}
    assert (
        options.check(["--micro-batch", "4"], 2).global_batch == 8
    )  # an explicit micro-batch keeps its meaning
    with pytest.raises(SystemExit, match=r"--global-batch 30 is not a multiple of DP 4 x --grad-accum 1"):
        options.check(["--global-batch", "30"], 4)
    with pytest.raises(SystemExit, match=r"give only one of --global-batch and --micro-batch"):
        options.check(["--global-batch", "32", "--micro-batch", "4"], 2)


def test_a_data_dir_tokenizer_that_differs_from_the_config_vocab_is_said(tmp_path):
    fake_data_dir(tmp_path, "data")
    args = options.check(["--model-config", "llama_tiny", "--data-dir", str(tmp_path / "data")], 1)
    assert any("the model uses the tokenizer's 2 tokens" in n and "says 1024" in n for n in args.notes)


# --- module layout -----------------------------------------------------------------------------------------
def test_launch_imports_run_one_way():
    """launch/*.py import each other without a cycle, only as `launch.<module>`, never editing sys.path
    (except the `python launch/pretrain.py` entry, which re-runs itself as the module)."""
    graph = {}
    for path in sorted((REPO / "launch").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        tree = ast.parse(path.read_text())
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("launch"):
                edges |= {
                    f"{node.module}.{a.name}" if node.module == "launch" else node.module for a in node.names
                }
            if isinstance(node, ast.Import):
                assert not any(
                    a.name in {"pretrain", "prepare_data", "memory", "engines", "checkpoint"}
                    for a in node.names
                ), (module, "imports a launch module by its bare name")
        graph[module] = edges
        text = path.read_text()
        assert "sys.path.insert" not in text, module
    seen, stack = set(), []

    def visit(m):
        assert m not in stack, f"import cycle: {' -> '.join(stack + [m])}"
        if m in seen or m not in graph:
            return
        stack.append(m)
        for n in graph[m]:
            visit(n)
        stack.pop()
        seen.add(m)

    for m in graph:
        visit(m)
    assert "launch.pretrain" not in graph["launch.prepare_data"]
