"""Fork-based multi-process runner for CPU (gloo) tests and benchmarks.

Forking ranks from a parent that has already imported torch/DeepSpeed/Megatron costs ~0.1 s per run
instead of ~5-20 s per spawned process. The parent must be single-threaded: a child gets a copy of every
lock, queue and event loop of the parent but none of its threads, so a child forked after OpenMP threads
or a live gloo process group (its tcp loop, run loops and TCPStore server threads) can hang forever.
run_ranks refuses both in one line; `destroy_parallel_state()` tears down what a test initialised in the
parent (Megatron's parallel state, every process group).

    results = run_ranks(fn, world_size=4, timeout=60)   # fn(rank, world_size) -> picklable

Rank 0 serves the TCPStore on a port the kernel picks (port 0) and passes it to the other ranks through
a pipe, so no other process can take the port between choosing and binding it. Each child gets
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* in its environment and an initialised gloo default group; whatever
happens, Megatron's parallel state and every process group are destroyed before it exits. A child's
exception is re-raised in the parent with its traceback; a run that outlives `timeout` is killed and reported.
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


# Threads of torch.distributed (gloo's tcp loop and run loops, the TCPStore server, ...): alive at a fork,
# they leave the child a copy of their loops and locks that nothing serves. Other libraries' pools (the
# tokenizers library's, which disables itself in a forked child) are not refused.
DISTRIBUTED_THREAD_PREFIXES = ("gloo", "pt_")


def distributed_threads() -> List[str]:
    """Names of this process's live torch.distributed threads (Linux: /proc/self/task; elsewhere none)."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if name.startswith(DISTRIBUTED_THREAD_PREFIXES):
            names.append(name)
    return names


def destroy_parallel_state() -> None:
    """Undo what a test initialised in this process: Megatron's parallel state and every process group,
    so that their gloo/TCPStore threads end. Megatron-core 0.16's destroy_model_parallel forgets some
    groups (_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP and its gloo twin); a group still referenced
    keeps its threads alive after dist.destroy_process_group(), so every group the module holds is
    dropped here."""
    import torch.distributed as dist

    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None:
        try:
            ps.destroy_model_parallel()
        except Exception:  # noqa: BLE001 - tearing down whatever was initialised
            pass
        for name, value in list(vars(ps).items()):
            if isinstance(value, dist.ProcessGroup):
                setattr(ps, name, None)
    if dist.is_initialized():
        dist.destroy_process_group()


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
    threads = distributed_threads()
    if threads:
        counts = ", ".join(f"{n} x{threads.count(n)}" for n in sorted(set(threads)))
        raise RuntimeError(
            f"run_ranks: the parent has {len(threads)} torch.distributed threads running ({counts}), "
            "a process group still alive; forked children inherit its loops without the threads and hang: "
            "call support.harness.destroy_parallel_state() in the parent first"
        )
    port_read, port_write = os.pipe()  # rank 0 -> the other ranks: the TCPStore's port
    children = []
    for rank in range(world_size):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(read_fd)
            ports = (port_read, port_write)
            _child(rank, world_size, ports, backend, env or {}, write_fd, fn, args, kwargs, timeout)
        os.close(write_fd)
        children.append((rank, pid, read_fd))
    os.close(port_read)
    os.close(port_write)
    return _collect(children, timeout)


def _store(rank, world_size, ports, timeout):
    """Rank 0 serves the TCPStore on a port the kernel picks and writes it once per other rank into the
    pipe (2-byte writes are atomic, so each reader gets one whole port); the others connect to it."""
    import torch.distributed as dist

    port_read, port_write = ports
    wait = timedelta(seconds=timeout)
    if rank == 0:
        os.close(port_read)
        store = dist.TCPStore("127.0.0.1", 0, world_size, True, wait, wait_for_workers=False)
        _write_all(port_write, struct.pack("!H", store.port) * (world_size - 1))
        os.close(port_write)
        return store
    os.close(port_write)
    raw = b""
    while len(raw) < 2:
        chunk = os.read(port_read, 2 - len(raw))
        if not chunk:
            raise RuntimeError("rank 0 exited before publishing its TCPStore port")
        raw += chunk
    os.close(port_read)
    return dist.TCPStore("127.0.0.1", struct.unpack("!H", raw)[0], world_size, False, wait)


def _child(rank, world_size, ports, backend, env, write_fd, fn, args, kwargs, timeout) -> None:
    status = 1
    try:
        store = _store(rank, world_size, ports, timeout)
        port = store.port
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
            store=store,
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
        destroy_parallel_state()
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
