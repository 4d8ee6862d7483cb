import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402

# Forked test ranks hang if the parent has started OpenMP threads: stay single-threaded.
torch.set_num_threads(1)
