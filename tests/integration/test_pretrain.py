"""launch/pretrain.py for real on 2 CPU processes: both backends, every tiny model config, pipeline
parallelism, checkpoint resume that continues exactly, and bad options refused before anything runs.

Most runs call pretrain.main() in ranks forked by run_ranks (the parent has imported everything: ~0.1 s
to start 2 ranks); one runs the script under torchrun, as scripts/pretrain.sh does."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import tolerance as tol
from support.harness import RankError, free_port, run_ranks

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from launch import corpus, prepare_data, pretrain  # noqa: E402
from launch import options as launch_options  # noqa: E402
from teonspeed.patches import cpu_shims  # noqa: E402

cpu_shims.apply()  # what pretrain.main does under --device cpu; the forked ranks inherit the imports
from launch import train as _train  # noqa: E402,F401  (megatron, deepspeed: imported once in the parent)

# the loss-goes-down runs: 8 steps at lrs where the tiny models drop by > 0.5 nats in them
SHORT_RUN = ["--steps", "8", "--warmup", "1", "--lr", "0.03", "--adamw-lr", "1e-2"]
TINY = [
    "--micro-batch",
    "4",
    "--seq",
    "32",
    "--eval-batches",
    "4",
    "--eval-every",
    "1000",
    "--log-every",
    "1000",
    "--progress",
    "off",
    "--no-tensorboard",
    "--no-plot",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small Megatron indexed dataset (a few stdlib modules, BPE vocab 512) in prepare_data.py's layout."""
    import importlib
    import inspect

    out = tmp_path_factory.mktemp("data")
    docs = []
    for name in ("argparse", "csv", "textwrap", "shlex"):
        docs += re.split(r"\n(?=(?:def|class) )", inspect.getsource(importlib.import_module(name)))
    docs = [d for d in docs if d.strip()]
    train, valid = corpus.split_documents(docs)
    tok = prepare_data.train_bpe(train, 512)
    tok.save(str(out / "tokenizer.json"))
    prepare_data.write_indexed_dataset(train, tok, out / "train", progress=False)
    prepare_data.write_indexed_dataset(valid, tok, out / "valid", progress=False)
    return out


def _main(rank, world_size, argv):
    return pretrain.main(argv)


def _main_measuring_rounding(rank, world_size, argv):
    """pretrain.main, and what rounding alone may move between two runs of its training: the rounding
    budget of the teonspeed optimizer's steps at the peak lr (tol.RoundingBudget, over all weights) and
    each step's gradient norm (the losses' sensitivity to the weights)."""
    from teonspeed.optim.base import OrthoOptimizer
    from support import tolerance as tol

    budgets, grad_norms = [], []
    init, step = OrthoOptimizer.__init__, OrthoOptimizer.step

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        budgets.append(tol.RoundingBudget(self))

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        grad_norms.append(float(torch.nn.utils.get_total_norm(grads)))
        return step(self, *args, **kwargs)

    OrthoOptimizer.__init__, OrthoOptimizer.step = recording_init, recording_step
    try:
        out = pretrain.main(argv)
    finally:
        OrthoOptimizer.__init__, OrthoOptimizer.step = init, step
    lr = float(argv[argv.index("--lr") + 1]) if "--lr" in argv else 0.02
    return dict(out, rounding=sum(b.weights(lr) for b in budgets), grad_norms=grad_norms)


def train(argv, world=2, timeout=120):
    return run_ranks(_main, world, argv, timeout=timeout)[0]


# (a) every tiny model config trains through the DeepSpeed engine and the loss goes down
@pytest.mark.parametrize("config", ["llama_tiny", "gpt2_tiny", "moe_tiny", "mla_moe_tiny"])
def test_tiny_configs_train_and_the_loss_goes_down(config, data_dir, tmp_path):
    out = train(
        [
            "--model-config",
            config,
            "--data-dir",
            str(data_dir),
            "--runs-dir",
            str(tmp_path),
            "--name",
            config,
            *SHORT_RUN,
            "--zero-stage",
            "2",
            *TINY,
        ]
    )
    assert (
        out["backend"] == "deepspeed"
        and out["wrapper"] == "DeepSpeedZeroOptimizer"
        and out["optimizer"] == "TEON"
    )
    (_, val0), (step, final) = out["vals"][0], out["vals"][-1]
    assert step == 8 and final < val0 - 0.5, out["vals"]
    assert out["losses"][-1] < out["losses"][0] - 0.5, out["losses"]
    rows = list(csv.DictReader(open(tmp_path / config / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(9))


def test_zero_stage_3_trains_and_the_loss_goes_down(data_dir, tmp_path):
    argv = ["--model-config", "llama_tiny", "--data-dir", str(data_dir), "--runs-dir", str(tmp_path)]
    argv += [*SHORT_RUN, "--zero-stage", "3", *TINY]
    out = train(argv)
    assert (out["wrapper"], out["optimizer"]) == ("DeepSpeedZeroOptimizer_Stage3", "TEON")
    assert out["losses"][-1] < out["losses"][0] - 0.5, out["losses"]


def test_zero_stage_3_refuses_tp_and_qk_clip_before_starting(tmp_path):
    from launch import options
    from launch.configs import ConfigError

    with pytest.raises(
        ConfigError, match=r"^error: --zero-stage 3 with --tp 2: .* use --zero-stage 1 or 2 with --tp"
    ):
        options.check(["--runs-dir", str(tmp_path), "--zero-stage", "3", "--tp", "2"], 2)
    qk = r"^error: --qk-clip/--qk-clip-log are not supported with --zero-stage 3"
    with pytest.raises(ConfigError, match=qk):
        options.check(["--runs-dir", str(tmp_path), "--zero-stage", "3", "--qk-clip", "50"], 2)


# (b) resume: 10 steps == 5 steps, save, resume, 5 steps (fp32, CPU): the same losses
@pytest.mark.parametrize(
    "backend,extra",
    [
        ("deepspeed", ["--zero-stage", "1", "--grad-accum", "2"]),
        ("deepspeed", ["--zero-stage", "3", "--grad-accum", "2"]),
        ("megatron", ["--grad-accum", "2"]),
        ("megatron", ["--grad-accum", "2", "--distributed-optimizer"]),
    ],
)
def test_resume_continues_exactly(backend, extra, data_dir, tmp_path, capfd):
    common = [
        "--data-dir",
        str(data_dir),
        "--runs-dir",
        str(tmp_path),
        "--steps",
        "10",
        "--warmup",
        "3",
        "--backend",
        backend,
        *extra,
        *TINY,
    ]
    full = train(common + ["--name", "full"])
    capfd.readouterr()
    first = train(common + ["--name", "split", "--save-every", "5", "--stop-at", "5"])
    assert (
        "stopped at step 5 of 10 (--stop-at); continue with the same command plus --resume (and --name split)"
        in capfd.readouterr().out
    )
    ckpts = tmp_path / "split" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [
        "step_00000005"
    ]  # (+ DeepSpeed's scripts)
    # A save that died halfway (no marker; a temp dir) must never be picked.
    (ckpts / ".tmp-step_00000008").mkdir()
    (ckpts / "step_00000009").mkdir()
    resumed = train(common + ["--name", "split", "--resume"])
    assert resumed["start"] == 5 and len(first["losses"]) == 5 and len(resumed["losses"]) == 5
    assert first["losses"] + resumed["losses"] == full["losses"]
    # The lr of every step is launch/schedule.py's in both backends (never 0 at the start), also after resume.
    from launch.schedule import lr_factor

    assert full["lrs"] == pytest.approx([0.02 * lr_factor(i, 3, 10, 0.1) for i in range(10)], rel=1e-12)
    assert first["lrs"] + resumed["lrs"] == full["lrs"] and full["lrs"][0] > 0
    assert resumed["vals"][-1] == full["vals"][-1]
    rows = list(csv.DictReader(open(tmp_path / "split" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(11))  # the CSV continues the checkpoint's rows


# (c) the Megatron backend with pipeline parallelism (1F1B over 2 stages, tied embeddings across them)
def test_megatron_backend_pipeline_parallel_2_trains(data_dir, tmp_path):
    out = train(
        [
            "--model-config",
            "gpt2_tiny",
            "--pp",
            "2",
            "--grad-accum",
            "2",
            "--data-dir",
            str(data_dir),
            "--runs-dir",
            str(tmp_path),
            "--name",
            "pp2",
            *SHORT_RUN,
            "--save-every",
            "4",
            "--keep-last",
            "1",
            *TINY,
        ]
    )
    assert (
        out["backend"] == "megatron" and out["optimizer"] == "TEON" and out["wrapper"] == "TeonFP32Optimizer"
    )
    assert out["vals"][-1][1] < out["vals"][0][1] - 0.5, out["vals"]
    assert [p.name for p in (tmp_path / "pp2" / "checkpoints").iterdir() if p.is_dir()] == ["step_00000008"]


# (c') Megatron's distributed optimizer from the launcher: the same training as plain Megatron DDP (fp32, no
# clipping), with overlap_grad_reduce (its default there, as Megatron-LM runs it) at Megatron's bucket size
# and at buckets smaller than a layer (~45k elements: TEON's q/k/v pairs straddle buckets); 2 micro-batches
# per step (DDP's no_sync until the last). And it clips on the CPU where plain Megatron's clip_grad cannot
# (it needs CUDA tensors).
def test_megatron_backend_distributed_optimizer_trains_like_plain_ddp(data_dir, tmp_path, capfd):
    common = [
        "--backend",
        "megatron",
        "--data-dir",
        str(data_dir),
        "--runs-dir",
        str(tmp_path),
        "--steps",
        "4",
        "--warmup",
        "1",
        "--grad-accum",
        "2",
        *TINY,
    ]
    plain = run_ranks(
        _main_measuring_rounding, 2, common + ["--name", "plain", "--clip-grad", "0"], timeout=120
    )[0]
    assert "Megatron DDP (overlap_grad_reduce off, 1 gradient bucket(s))" in capfd.readouterr().out
    distributed = train(common + ["--name", "distopt", "--clip-grad", "0", "--distributed-optimizer"])
    header = capfd.readouterr().out
    assert "Megatron DDP (overlap_grad_reduce on, 1 gradient bucket(s) of 40000000 elements)" in header
    small = train(
        common
        + [
            "--name",
            "distopt-small",
            "--clip-grad",
            "0",
            "--distributed-optimizer",
            "--ddp-bucket-size",
            "20000",
        ]
    )
    buckets = re.search(
        r"overlap_grad_reduce on, (\d+) gradient bucket\(s\) of 20000 elements", capfd.readouterr().out
    )
    assert buckets and int(buckets.group(1)) >= 8
    assert plain["wrapper"] == "TeonFP32Optimizer" and distributed["wrapper"] == "TeonDistributedOptimizer"
    # the same gradients (each rank accumulates its micro-batches in the same order; two ranks' sums are
    # exact in either order): the weights differ by the iterations' rounding only (the plain run's budget),
    # the losses by ‖∇L‖ times that plus their own rounding
    assert len(plain["losses"]) == 4
    for run in (distributed, small):
        for a, b, g in zip(run["losses"], plain["losses"], plain["grad_norms"]):
            assert abs(a - b) <= g * plain["rounding"] + tol.sums(torch.float32, 512) * abs(b)
    capfd.readouterr()
    train(common + ["--name", "plain-clipped"])
    assert "gradient clipping off" in capfd.readouterr().out
    train(common + ["--name", "distopt-clipped", "--distributed-optimizer"])
    assert "gradient clipping off" not in capfd.readouterr().out


# (d) bad input: a clear error naming the option and the fix, before any process group or file
def _refused(argv, match, world=2, tmp_path=None, monkeypatch=None):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit, match=match):
        pretrain.main(argv + ["--runs-dir", str(tmp_path), "--name", "bad"])
    import torch.distributed as dist

    assert not dist.is_initialized()
    assert not (tmp_path / "bad").exists()


def test_unknown_model_config_key_is_refused(tmp_path, monkeypatch):
    cfg = (
        (REPO / "configs" / "models" / "llama_tiny.yaml")
        .read_text()
        .replace("num_layers: 4", "num_layers: 4\n  num_layer: 4")
    )
    cfg = cfg.replace("  activation: silu", "  activation: silu\n  vocab_szie: 7")
    (tmp_path / "typo.yaml").write_text(cfg)
    _refused(
        ["--model-config", str(tmp_path / "typo.yaml")],
        r"--model-config .*typo.yaml section 'model': unknown model key\(s\) 'vocab_szie' \(did you mean "
        r"'vocab_size'\?\)",
        tmp_path=tmp_path,
        monkeypatch=monkeypatch,
    )
    (tmp_path / "typo.yaml").write_text(cfg.replace("\n  vocab_szie: 7", ""))
    _refused(
        ["--model-config", str(tmp_path / "typo.yaml")],
        r"unknown transformer key\(s\) 'num_layer' \(did you mean 'num_layers'\?\); it takes the fields of "
        r"megatron.core TransformerConfig",
        tmp_path=tmp_path,
        monkeypatch=monkeypatch,
    )


@pytest.mark.parametrize(
    "argv,world,match",
    [
        (
            ["--tp", "2", "--pp", "2", "--backend", "megatron"],
            2,
            r"--tp 2 x --pp 2 x --ep 1 = 4 does not divide the world size 2",
        ),
        (["--tp", "3"], 2, r"--tp 3 x --pp 1 x --ep 1 = 3 does not divide the world size 2"),
        (["--pp", "3", "--layers", "4"], 3, r"--pp 3 does not divide num_layers=4"),
        (["--pp", "2", "--backend", "deepspeed"], 2, r"--pp 2 needs --backend megatron"),
        (["--distributed-optimizer"], 2, r"--distributed-optimizer is Megatron's"),
        (
            ["--distributed-optimizer", "--backend", "megatron", "--optimizer", "adamw"],
            2,
            r"needs CUDA tensors",
        ),
        (
            ["--overlap-grad-reduce"],
            2,
            r"--overlap-grad-reduce configures Megatron DDP: add --backend megatron",
        ),
        (
            ["--backend", "megatron", "--ddp-bucket-size", "1000"],
            2,
            r"--ddp-bucket-size 1000: Megatron DDP buckets only with overlap_grad_reduce .*"
            r"add --overlap-grad-reduce",
        ),
        (
            ["--layers", "6", "--pp", "2", "--teon-k", "2"],
            2,
            r"--teon-k 2 does not divide the 3 layers per pipeline stage .*use a --teon-k that divides 3, "
            r"or a smaller --pp",
        ),
        (
            ["--pp", "2", "--teon-k", "4"],
            2,
            r"--teon-k 4 is more than the 2 layers per pipeline stage .*no TEON stack",
        ),
        (["--ep", "2", "--backend", "megatron"], 2, r"--ep 2 needs a MoE model"),
        (
            ["--model-config", "moe_tiny", "--ep", "3", "--backend", "megatron"],
            3,
            r"--ep 3 does not divide num_moe_experts=4",
        ),
        (["--save-every", "0", "--keep-last", "2"], 2, r"--keep-last needs --save-every"),
    ],
)
def test_bad_layout_is_refused(argv, world, match, tmp_path, monkeypatch):
    _refused(argv, match, world=world, tmp_path=tmp_path, monkeypatch=monkeypatch)


def test_missing_data_dir_is_refused(tmp_path, monkeypatch):
    _refused(
        ["--data-dir", str(tmp_path / "nowhere")],
        r"--data-dir .*nowhere does not exist; write it with `python -m launch.prepare_data --embedded",
        tmp_path=tmp_path,
        monkeypatch=monkeypatch,
    )
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "tokenizer.json").write_text("{}")
    _refused(
        ["--data-dir", str(tmp_path / "half")],
        r"lacks train.bin, train.idx, valid.bin, valid.idx",
        tmp_path=tmp_path,
        monkeypatch=monkeypatch,
    )


def test_a_bad_layout_in_forked_ranks_raises_on_every_rank(tmp_path):
    with pytest.raises(RankError, match=r"(?s)rank 1 raised:.*--pp 3 does not divide num_layers=4"):
        train(["--pp", "3", "--backend", "megatron", "--runs-dir", str(tmp_path)], world=3)


# The real launcher: torchrun, 2 processes, the script as scripts/pretrain.sh runs it (progress bar on).
def test_torchrun_runs_the_script_and_writes_the_run_directory(data_dir, tmp_path):
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        TORCHDYNAMO_DISABLE="1",
        PYTHONWARNINGS="ignore::UserWarning,ignore::FutureWarning",
    )
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nnodes=1",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "launch.pretrain",
        "--data-dir",
        str(data_dir),
        "--runs-dir",
        str(tmp_path),
        "--name",
        "tr",
        "--steps",
        "6",
        "--warmup",
        "1",
        "--micro-batch",
        "4",
        "--seq",
        "32",
        "--eval-batches",
        "2",
        "--eval-every",
        "3",
        "--log-every",
        "2",
        "--save-every",
        "3",
        "--progress",
        "on",
        "--zero-stage",
        "2",
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "backend: DeepSpeed engine, ZeRO stage 2, optimizer TEON" in proc.stdout
    assert "step | train loss | val loss" in proc.stdout and "initial val loss" in proc.stdout
    assert "train:" in proc.stderr and "6/6" in proc.stderr  # tqdm's bar on rank 0
    run = tmp_path / "tr"
    assert (run / "metrics.csv").is_file() and (run / "loss.png").stat().st_size > 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == [
        "step_00000003",
        "step_00000006",
    ]
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert "tensorboard: not written" in proc.stdout
    else:
        assert any((run / "tensorboard").iterdir())


def test_ds_config_json_is_kept_and_the_cli_sets_batch_sizes_and_steps():
    from launch.engines import deepspeed_config

    path = REPO / "configs" / "deepspeed" / "teon_zero2_bf16.json"
    args = launch_options.parse_args(
        ["--ds-config", str(path), "--steps", "30", "--micro-batch", "2", "--grad-accum", "3"]
    )
    launch_options.validate(args, 2)
    config = deepspeed_config(args, dp=2)
    assert (
        config["optimizer"] == args.ds_config_dict["optimizer"] and config["zero_optimization"]["stage"] == 2
    )
    assert config["bf16"] == {"enabled": True} and config["gradient_clipping"] == 1.0
    assert "scheduler" not in config  # launch/schedule.py's, passed to deepspeed.initialize
    assert (args.warmup, args.min_lr_ratio) == (3, 0.1)  # the JSON's 500 does not fit 30 steps: --steps / 10
    assert any("warmup_num_steps=500 does not fit --steps 30" in n for n in args.notes)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (2, 3)
    # Explicit flags win over the JSON; without --ds-config the CLI builds the whole config.
    args = launch_options.parse_args(
        ["--ds-config", str(path), "--optimizer", "muon", "--lr", "0.05", "--zero-stage", "1"]
    )
    launch_options.validate(args, 2)
    config = deepspeed_config(args, dp=2)
    assert config["optimizer"]["type"] == "TeonspeedMuon" and config["optimizer"]["params"]["lr"] == 0.05
    assert config["zero_optimization"]["stage"] == 1
    config = deepspeed_config(launch_options.parse_args(["--optimizer", "adamw"]), dp=2)
    assert config["optimizer"]["type"] == "AdamW"
