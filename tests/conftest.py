import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
# ns_dtype="auto" on the CPU follows a timing probe; tests compare with fp32 references on every machine.
os.environ.setdefault("TEONSPEED_CPU_BF16", "0")

import torch  # noqa: E402

# Forked test ranks hang if the parent has started OpenMP threads (or left a process group alive): stay
# single-threaded. support.harness.run_ranks refuses a parent with a process group's threads running.
torch.set_num_threads(1)
