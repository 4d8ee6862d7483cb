"""Fork-based multi-process runner for CPU (gloo) tests and benchmarks.

Forking ranks from a parent that has already imported torch/DeepSpeed/Megatron costs ~0.1 s per run
instead of ~5-20 s per spawned process. The parent must be single-threaded (torch.set_num_threads(1)
before any tensor op): a child forked after OpenMP threads were started can hang forever.

    results = run_ranks(fn, world_size=4, timeout=60)   # fn(rank, world_size) -> picklable

Each child gets a fresh loopback port, RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* in its environment and an
initialised gloo default group; whatever happens, Megatron's parallel state and every process group are
destroyed before it exits. A child's exception is re-raised in the parent with its traceback; a run
that outlives `timeout` is killed and reported.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import struct
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, List

import torch


class RankError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    env: dict | None = None,
    **kwargs: Any,
) -> List[Any]:
    """Run fn(rank, world_size, *args, **kwargs) in `world_size` forked processes; return the results."""
    if torch.get_num_threads() != 1:
        raise RuntimeError(
            "run_ranks: call torch.set_num_threads(1) in the parent before any tensor op; "
            "forking a process that has started OpenMP threads can deadlock the children"
        )
    port = free_port()
    children = []
    for rank in range(world_size):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(read_fd)
            _child(rank, world_size, port, backend, env or {}, write_fd, fn, args, kwargs, timeout)
        os.close(write_fd)
        children.append((rank, pid, read_fd))
    return _collect(children, timeout)


def _child(rank, world_size, port, backend, env, write_fd, fn, args, kwargs, timeout) -> None:
    status = 1
    try:
        os.environ.update(
            {
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
        )
        os.environ.update(env)
        torch.set_num_threads(1)
        import torch.distributed as dist

        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        try:
            payload = ("ok", fn(rank, world_size, *args, **kwargs))
        except BaseException:  # noqa: BLE001 - everything is reported to the parent
            payload = ("error", traceback.format_exc())
        # Report before tearing down, so a crash in a library's exit path cannot lose the result.
        data = pickle.dumps(payload)
        _write_all(write_fd, struct.pack("!Q", len(data)) + data)
        os.close(write_fd)
        _teardown()
        status = 0
    except BaseException:  # noqa: BLE001 - e.g. init_process_group failed: report it if the pipe is open
        try:
            data = pickle.dumps(("error", traceback.format_exc()))
            _write_all(write_fd, struct.pack("!Q", len(data)) + data)
        except Exception:  # noqa: BLE001
            pass
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _teardown() -> None:
    import torch.distributed as dist

    if "megatron.core.parallel_state" in sys.modules:
        try:
            sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
        except Exception:  # noqa: BLE001
            pass
    if dist.is_initialized():
        dist.destroy_process_group()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _collect(children, timeout: float) -> List[Any]:
    deadline = time.monotonic() + timeout
    buffers = {fd: bytearray() for _, _, fd in children}
    open_fds = set(buffers)
    while open_fds:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select(list(open_fds), [], [], remaining)
        for fd in ready:
            chunk = os.read(fd, 1 << 20)
            if chunk:
                buffers[fd] += chunk
            else:
                open_fds.discard(fd)
                os.close(fd)
    timed_out = bool(open_fds)
    for rank, pid, fd in children:
        if timed_out:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.waitpid(pid, 0)
        if fd in open_fds:
            os.close(fd)
    results, errors = [], []
    for rank, _, fd in children:
        raw = bytes(buffers[fd])
        if len(raw) < 8:
            errors.append(f"rank {rank}: " + ("timed out" if timed_out else "died without a result"))
            results.append(None)
            continue
        kind, value = pickle.loads(raw[8 : 8 + struct.unpack("!Q", raw[:8])[0]])
        if kind == "error":
            errors.append(f"rank {rank} raised:\n{value}")
        results.append(value)
    if errors:
        head = f"run_ranks timed out after {timeout:.0f}s\n" if timed_out else ""
        raise RankError(head + "\n".join(errors))
    return results
