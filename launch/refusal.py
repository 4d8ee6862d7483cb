"""One line per mistake: how a launch process reports a setup it refuses.

A refusal is the launcher's own (a ConfigError or CheckpointError: a SystemExit carrying its message) or
an option or model that teonspeed itself refuses (a ValueError or TypeError raised in the teonspeed
package, e.g. at the optimizer's construction inside deepspeed.initialize). It is printed as one line,
message first, by rank 0 alone, and the process exits with status REFUSED; no traceback, no copy per
rank. Any other exception is no refusal but a bug and keeps its traceback.

Ranks other than 0 stay silent when the refusal is the same on every rank by construction (ConfigError:
computed from the flags and the world size; CheckpointError: agreed on by the ranks). For any other
refusal a rank other than 0 waits GRACE_S first: when rank 0 refused too, the launcher (torchrun, the
deepspeed launcher) ends this process as soon as rank 0 exits; when rank 0 did not, this rank's message
is printed, with its rank, instead of being lost.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from launch.configs import ConfigError

REFUSED = 2  # the exit status of a refused setup (argparse's for a command-line mistake)
GRACE_S = 5.0


def _raised_in_teonspeed(err: BaseException) -> bool:
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    import teonspeed  # light: neither DeepSpeed nor Megatron

    package = Path(teonspeed.__file__).parent.resolve()
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(package)


def one_line(err: BaseException) -> Optional[str]:
    """The line a refusal prints ("error: ..."), or None when `err` is no refusal."""
    if isinstance(err, SystemExit):
        message = err.code if isinstance(err.code, str) else None
    elif isinstance(err, (ValueError, TypeError)) and _raised_in_teonspeed(err):
        message = str(err)
    else:
        message = None
    if message is None:
        return None
    return message if message.startswith("error:") else f"error: {message}"


def same_on_every_rank(err: BaseException) -> bool:
    checkpoint = sys.modules.get("launch.checkpoint")  # not imported yet: err cannot be its CheckpointError
    agreed = checkpoint is not None and isinstance(err, checkpoint.CheckpointError)
    return isinstance(err, ConfigError) or agreed


def report(message: str, rank: int, everywhere: bool, grace_s: float = GRACE_S) -> None:
    if rank == 0:
        print(message, file=sys.stderr, flush=True)
    elif not everywhere:
        time.sleep(grace_s)  # the launcher ends this process here when rank 0 refused too
        print(f"{message} (rank {rank})", file=sys.stderr, flush=True)


def run(main: Callable[[], object], grace_s: float = GRACE_S) -> int:
    """Call main(); return 0, or REFUSED after reporting a refusal once. Other exceptions propagate."""
    try:
        main()
    except (SystemExit, ValueError, TypeError) as err:
        message = one_line(err)
        if message is None:
            raise
        report(message, int(os.environ.get("RANK", "0")), same_on_every_rank(err), grace_s)
        return REFUSED
    return 0
