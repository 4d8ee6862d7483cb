"""torchrun, for the launch suite: `python -m launch.torchrun ARGS` is `torchrun ARGS`, except when the job
ends because its ranks refused the setup.

A refusal (launch/refusal.py) exits with status 2 after rank 0 has printed the one line that says what
is wrong; torchrun would then add its own failure report (its lines about ending the other ranks and
about the failed one, its traceback and a table of the ranks: about 35 lines) after that line. Here,
when every failed rank exited with the refusal's status (or was ended by torchrun after such a rank),
the report is left out and the status is passed on; any other failure gets torchrun's report unchanged.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import List, Optional, Sequence

from launch.refusal import REFUSED

ENDED_BY_TORCHRUN = {-signal.SIGTERM, -signal.SIGKILL}
SHUTDOWN_LINES = ("closing signal", "failed (exitcode:")  # torchrun logs these once a rank has failed


class _HoldShutdownLines(logging.Filter):
    """Holds torchrun's shutdown lines back until it is known whether the ranks refused or failed."""

    def __init__(self):
        super().__init__()
        self.held: List[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if any(line in record.getMessage() for line in SHUTDOWN_LINES):
            self.held.append(record)
            return False
        return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    logger = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    hold = _HoldShutdownLines()
    logger.addFilter(hold)
    try:
        torchrun(list(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        if REFUSED in codes and codes <= {REFUSED} | ENDED_BY_TORCHRUN:
            return REFUSED
        logger.removeFilter(hold)
        for record in hold.held:
            logger.handle(record)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
