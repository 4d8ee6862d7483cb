"""launch/pretrain.py end to end (DeepSpeed, ZeRO-1, 2 CPU ranks): the issue's scenario. One ZeRO partition
of the latest checkpoint is truncated; --resume-strict stops naming that file, --resume falls back to the
previous checkpoint and continues exactly (the losses after it equal the first run's)."""

import pytest

from support.harness import RankError
from test_pretrain import TINY, data_dir, train  # noqa: F401  (data_dir: the module's dataset fixture)


def test_truncated_partition_strict_stops_and_resume_falls_back(data_dir, tmp_path):  # noqa: F811
    common = [
        "--data-dir",
        str(data_dir),
        "--runs-dir",
        str(tmp_path),
        "--name",
        "run",
        "--steps",
        "6",
        "--warmup",
        "2",
        "--backend",
        "deepspeed",
        "--zero-stage",
        "1",
        "--save-every",
        "2",
        *TINY,
    ]
    first = train(common + ["--stop-at", "4"])
    bad = next((tmp_path / "run" / "checkpoints" / "step_00000004").glob("zero_pp_rank_1_*optim_states.pt"))
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(RankError, match=f"--resume-strict: .*{bad.name} has .* bytes"):
        train(common + ["--resume-strict"])
    resumed = train(common + ["--resume"])
    assert resumed["start"] == 2
    assert resumed["losses"][:2] == first["losses"][2:4]
