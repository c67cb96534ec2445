"""Ranks: who this process is in a multi-process launch, how ranks meet, and how hallu launches N of itself.

A stage launched as N processes (``torchrun``, ``accelerate launch``, or ``hallu ... --nproc N`` /
``--gpus N``) is one stage: rank 0 holds the stage lock and writes the manifest, every rank works on
its share of the fixed batches, rank 0 merges. This module is the one place that knows about ranks:

- :func:`rank`, :func:`world_size`, :func:`local_rank` read the launcher's ``RANK`` / ``WORLD_SIZE`` /
  ``LOCAL_RANK``; one plain process is rank 0 of 1, and every function here is then a no-op.
- :func:`init` joins the process group (gloo on CPU, nccl on CUDA) plus a gloo group of our own for
  coordination; :func:`barrier` and :func:`share` use it; :func:`teardown` leaves.
- :func:`relaunch` re-executes the current command as N ranks under ``accelerate launch``.

Waiting is done by polling asynchronous gloo work from Python, never inside one blocking C++ call:
a rank that dies closes its sockets, so the others see it within a second, and a SIGTERM from the
launcher (it stops the survivors when one rank fails) is handled like Ctrl-C instead of waiting for
the SIGKILL that follows.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from hallu.errors import HalluError

# Ranks may wait for each other for a long time (a resumed launch deals batches unevenly, an eval's
# rank 0 waits for the slowest rank): a dead peer is found by its closed sockets, not by a timeout.
_COORD_TIMEOUT = timedelta(days=7)
_POLL_S = 0.05
_coord_group = None  # the gloo group of this process, once init() ran


class WorkerDone(BaseException):
    """Raised on ranks other than 0 once their share of a stage is merged.

    What follows a stage's item loop (scoring, reports, judge calls, the manifest) is rank 0's alone;
    the CLI boundary turns this into a quiet exit 0. A BaseException, so no ``except Exception``
    between the stage loop and the boundary swallows it.
    """


# --------------------------------------------------------------------------------------------------
# Who am I


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise HalluError(f"environment variable {name}={value!r}: not an integer (set by the launcher)") from None


def rank() -> int:
    return _env_int("RANK", 0)


def world_size() -> int:
    return _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """Rank 0 (or the only process): the one that takes the stage lock and writes files other ranks read."""
    return rank() == 0


def is_distributed() -> bool:
    return world_size() > 1


def rank_device(device: str) -> str:
    """The device a rank computes on: ``cuda:LOCAL_RANK`` when CUDA is there and the user asked for
    ``auto`` or plain ``cuda``; otherwise what was asked (``cpu``, an explicit ``cuda:3``). With more
    ranks than GPUs (``--nproc`` on a small CUDA machine) ranks share them in turn."""
    if not is_distributed() or device not in ("auto", "cuda"):
        return device
    import torch

    if torch.cuda.is_available():
        return f"cuda:{local_rank() % torch.cuda.device_count()}"
    return device


# --------------------------------------------------------------------------------------------------
# Meeting the other ranks


def init() -> None:
    """Join the launch's process group (idempotent; nothing to do in a single process).

    The default group uses nccl when CUDA is available (for training code that needs it) and gloo
    otherwise; if a library (accelerate, DeepSpeed) already created it, it is kept. Coordination
    (barriers, :func:`share`) always runs on a separate gloo group with a long timeout.
    """
    global _coord_group
    if not is_distributed() or _coord_group is not None:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available() and world_size() <= torch.cuda.device_count():
            torch.cuda.set_device(local_rank())
            dist.init_process_group("nccl", timeout=timedelta(minutes=30))
        else:
            dist.init_process_group("gloo", timeout=_COORD_TIMEOUT)
    _coord_group = dist.new_group(backend="gloo", timeout=_COORD_TIMEOUT)


def _wait(work, what: str) -> None:
    """Poll ``work`` so signals are handled while waiting; a dead peer becomes one clear error."""
    try:
        while not work.is_completed():
            time.sleep(_POLL_S)
        work.wait()
    except RuntimeError as e:  # gloo: "Connection closed by peer", "Connection reset", timeouts
        raise HalluError(
            f"rank {rank()}: another rank of this launch stopped while waiting for {what} ({_short(e)}); "
            "nothing was merged; rerun the same command to resume"
        ) from None


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # drop gloo's "[.../pair.cc:553]" source location
    return text[:120]


def barrier(what: str) -> None:
    """Wait until every rank got here. ``what`` names what is awaited, for the error if a rank dies."""
    if not is_distributed():
        return
    import torch.distributed as dist

    init()
    _wait(dist.barrier(group=_coord_group, async_op=True), what)


def share(value: Any, what: str = "rank 0") -> Any:
    """Rank 0's ``value`` (anything JSON can carry) on every rank; other ranks' arguments are ignored."""
    if not is_distributed():
        return value
    import torch
    import torch.distributed as dist

    init()
    data = json.dumps(value).encode() if is_main() else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    _wait(dist.broadcast(size, src=0, group=_coord_group, async_op=True), what)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8)
    if is_main():
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    if buf.numel():
        _wait(dist.broadcast(buf, src=0, group=_coord_group, async_op=True), what)
    return json.loads(bytes(buf.tolist()).decode()) if not is_main() else value


def teardown() -> None:
    """Leave the coordination group (and the default group if nobody else uses it any more)."""
    global _coord_group
    if _coord_group is None:
        return
    import torch.distributed as dist

    try:
        dist.destroy_process_group(_coord_group)
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        _coord_group = None


def leave_if_worker() -> None:
    """On ranks other than 0: leave the launch and stop (raises :class:`WorkerDone`). No-op on rank 0."""
    if is_main():
        return
    teardown()
    raise WorkerDone()


# --------------------------------------------------------------------------------------------------
# Launching N ranks of this command

_RANK_LINE = re.compile(r"^\[[A-Za-z_]+?(\d+)\]:(.*)$")  # torchrun --tee: "[default1]:text"
_ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)
_AGENT_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)")
# Lines a rank's CLI boundary prints when it stops; the parent prints one of them, not N.
_FINAL_LINE = re.compile(r"^(error:|interrupted)")


def free_port() -> int:
    """A TCP port nobody listens on now (the kernel's pick), for the launch's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_processes(nproc: int | None, gpus: int | None) -> int:
    """Validate ``--nproc`` / ``--gpus`` before anything is loaded; return the number of processes."""
    if nproc is not None and gpus is not None:
        raise HalluError("--nproc and --gpus: give one of them (--gpus on GPU machines, --nproc for CPU processes)")
    if nproc is None and gpus is None:
        raise HalluError("relaunch: give nproc or gpus")
    if is_distributed():
        raise HalluError(
            f"--{'nproc' if nproc is not None else 'gpus'}: this process is already rank {rank()} of "
            f"{world_size()} (started by torchrun or accelerate launch); drop --nproc/--gpus"
        )
    if nproc is not None:
        cores = os.cpu_count() or 1
        if not 1 <= nproc <= cores:
            raise HalluError(f"--nproc {nproc}: this machine has {cores} CPU cores; give 1 to {cores} processes")
        return nproc
    if gpus < 1:
        raise HalluError(f"--gpus {gpus}: must be at least 1")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > count:
        hint = "; on a CPU machine use --nproc N" if count == 0 else ""
        raise HalluError(f"--gpus {gpus}: this machine has {count} CUDA GPUs (torch.cuda.device_count()){hint}")
    return gpus


def launch_command(argv: Sequence[str], processes: int, *, port: int, log_dir: str,
                   launcher_args: Sequence[str] = (), module: str = "hallu") -> list[str]:
    """The ``accelerate launch`` command line that starts ``processes`` ranks of ``python -m module argv``."""
    extra = list(launcher_args)
    # --multi_gpu selects torchrun's launcher, which really starts N processes (on CPU too: accelerate's
    # --cpu would force its simple launcher, ONE process). A DeepSpeed or config-file launch brings its own.
    own_type = any(a.startswith(("--use_deepspeed", "--config_file", "--use_fsdp", "--multi_gpu")) for a in extra)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
           "--num_machines", "1", "--main_process_port", str(port), "--tee", "3", "--log_dir", log_dir]
    if not any(a.startswith("--mixed_precision") for a in extra):
        cmd += ["--mixed_precision", "no"]
    if not any(a.startswith("--dynamo_backend") for a in extra):
        cmd += ["--dynamo_backend", "no"]
    if not own_type:
        cmd.append("--multi_gpu")
    return cmd + extra + ["--module", module, *argv]


def relaunch(argv: Sequence[str], *, nproc: int | None = None, gpus: int | None = None,
             launcher_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
             module: str = "hallu") -> int:
    """Run ``python -m hallu ARGV`` as N ranks under ``accelerate launch``; stream rank 0's output.

    Parameters:
        argv: the hallu command line to run in every rank, *without* ``--nproc``/``--gpus`` (e.g.
            ``["rollout", "--run", "r", "--model", "m"]``); the ranks run in this working directory.
        nproc: N processes on this machine (CPU ranks over gloo; on a CUDA machine they get a GPU each).
        gpus: N processes, one per CUDA device (``cuda:LOCAL_RANK``, nccl). Give exactly one of the two.
        launcher_args: extra ``accelerate launch`` arguments, placed before the module, e.g.
            ``["--use_deepspeed", "--deepspeed_config_file", "zero3.json"]`` or ``["--config_file",
            "accel.yaml"]``; with one of those (or ``--use_fsdp``) ``--multi_gpu`` is not added.
        env: extra environment for the ranks (overrides what is set here).
        module: the module the ranks run (``python -m module``); ``hallu`` by default.

    Checks N first (``--nproc`` above ``os.cpu_count()`` or ``--gpus`` above
    ``torch.cuda.device_count()`` is a :class:`HalluError`), before anything is loaded. On CPU the
    ranks get ``OMP_NUM_THREADS = cores // N`` (unless set) and ``ACCELERATE_USE_CPU=true`` (unless
    ``launcher_args`` select DeepSpeed, whose CPU setup is the training code's, see cpu-stack §5b), so
    accelerate-based code in the ranks really runs N-way instead of N times alone. ``HALLU_DEBUG``
    and the rest of the environment pass through.

    Output: rank 0's stdout and stderr are streamed as they come (other ranks' are kept in a
    temporary log folder, deleted afterwards); the launcher's own chatter is shown only with
    HALLU_DEBUG. Returns 0 when every rank succeeded. Otherwise raises ONE :class:`HalluError`:
    the ``error:`` line of the rank that failed first, or "rank R exited with code C; nothing was
    merged; rerun the same command to resume" for a rank that died without one (a bug's traceback
    from that rank is printed to stderr first). Ctrl-C reaches the ranks (same process group) and
    surfaces here as KeyboardInterrupt once they stopped.
    """
    processes = check_processes(nproc, gpus)
    cpu = gpus is None and not _cuda_available()
    child_env = dict(os.environ)
    child_env["PYTHONUNBUFFERED"] = "1"
    if cpu:
        child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
        if not any(a.startswith("--use_deepspeed") for a in launcher_args):
            child_env.setdefault("ACCELERATE_USE_CPU", "true")
    child_env.update(env or {})
    with tempfile.TemporaryDirectory(prefix="hallu-launch-") as log_dir:
        cmd = launch_command(argv, processes, port=free_port(), log_dir=log_dir, launcher_args=launcher_args,
                             module=module)
        outcome = _Stream(debug=child_env.get("HALLU_DEBUG", "") not in ("", "0"))
        proc = subprocess.Popen(cmd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1)
        readers = [threading.Thread(target=outcome.pump, args=(proc.stdout, sys.stdout), daemon=True),
                   threading.Thread(target=outcome.pump, args=(proc.stderr, sys.stderr), daemon=True)]
        for t in readers:
            t.start()
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            proc.wait()  # the ranks got the same Ctrl-C; let them write "interrupted" and stop
            for t in readers:
                t.join(5)
            raise
        for t in readers:
            t.join(30)
    if code == 0:
        outcome.flush_final_lines()
        return 0
    raise HalluError(outcome.failure(code))


def _cuda_available() -> bool:
    # Without an NVIDIA driver there is no CUDA: skip importing torch (seconds) in the launching process.
    if not any(os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0")):
        return False
    import torch

    return torch.cuda.is_available()


class _Stream:
    """Demultiplexes the launcher's output: ``[defaultR]:`` lines are rank R's, the rest the launcher's."""

    def __init__(self, debug: bool):
        self.debug = debug
        self.launcher: list[str] = []
        self.final: dict[int, list[str]] = {}  # per rank: its error:/interrupted lines, held back
        self.stderr: dict[int, list[str]] = {}  # per rank: its last stderr lines (for a bug's traceback)
        self._lock = threading.Lock()

    def pump(self, pipe, sink) -> None:
        for raw in pipe:
            line = raw.rstrip("\n")
            m = _RANK_LINE.match(line)
            with self._lock:
                if m is None:
                    self.launcher.append(line)
                    del self.launcher[:-400]
                    if self.debug:
                        print(line, file=sys.stderr, flush=True)
                    continue
                r, text = int(m.group(1)), m.group(2)
                if sink is sys.stderr:
                    tail = self.stderr.setdefault(r, [])
                    tail.append(text)
                    del tail[:-200]
                    if _FINAL_LINE.match(text):
                        self.final.setdefault(r, []).append(text)
                        continue
                if r == 0:
                    print(text, file=sink, flush=True)

    def flush_final_lines(self) -> None:
        for text in self.final.get(0, []):
            print(text, file=sys.stderr, flush=True)

    def failure(self, code: int) -> str:
        """The one line that explains a failed launch."""
        log = "\n".join(self.launcher)
        m = _ROOT_CAUSE.search(log)
        if m:
            failed, exitcode = int(m.group(1)), int(m.group(2))
        else:
            m = _AGENT_FAILED.search(log)
            if m is None:
                last = next((ln for ln in reversed(self.launcher) if ln.strip()), "no output")
                return f"accelerate launch failed (exit code {code}): {last.strip()[:200]}"
            failed, exitcode = int(m.group(2)), int(m.group(1))
        errors = [t for t in self.final.get(failed, []) if t.startswith("error:")]
        if errors:
            return errors[0][len("error:"):].strip()
        if failed != 0 and exitcode > 0 and exitcode not in (130, 143):
            # Not a user error: a bug. Its traceback is the useful part; show it before the summary
            # (rank 0's stderr was streamed already).
            for text in self.stderr.get(failed, []):
                print(text, file=sys.stderr)
        how = f"code {exitcode}" if exitcode >= 0 else f"code {exitcode} (killed by signal {-exitcode})"
        return f"rank {failed} exited with {how}; nothing was merged; rerun the same command to resume"
