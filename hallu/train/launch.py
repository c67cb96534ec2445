"""Re-launch a training command under ``accelerate launch`` with a packaged DeepSpeed config.

``hallu sft --gpus 4 ...`` (or ``--nproc 2`` on a CPU machine, or ``--accelerate-config ...``) runs
this process again as N ranks: ``python -m accelerate.commands.launch ... -m hallu sft ...`` with the
same arguments. The ranks see ``LOCAL_RANK`` and the DeepSpeed JSON in ``HALLU_DEEPSPEED_CONFIG``,
so they train instead of launching again. More than one process means ZeRO-3 unless the user names
another config. Multi-node runs are accelerate's job: run ``accelerate launch --config_file ...
-m hallu sft ...`` on every node yourself.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from importlib import resources
from pathlib import Path

from hallu.errors import HalluError

PACKAGED_CONFIGS = ("zero2", "zero3", "zero3-offload")
_CONFIG_ENV = "HALLU_DEEPSPEED_CONFIG"


def packaged_config(name: str) -> Path:
    """Path of a shipped DeepSpeed JSON (zero2, zero3, zero3-offload)."""
    return Path(str(resources.files("hallu.data") / "accelerate" / f"{name}.json"))


def in_launched_process() -> bool:
    """True inside a rank started by a launcher (ours, accelerate, torchrun, deepspeed)."""
    return "LOCAL_RANK" in os.environ or "HALLU_LAUNCHED" in os.environ


def plan_launch(gpus: int | None, nproc: int | None, accelerate_config: str | None) -> dict | None:
    """What to launch, validated, or None to run in this process. No side effects.

    Returns ``{"processes", "deepspeed_config", "accelerate_config_file", "cpu"}``.
    """
    if in_launched_process():
        return None
    if gpus is not None and nproc is not None:
        raise HalluError("--gpus and --nproc: give one of them (--gpus on GPU machines, --nproc for CPU processes)")
    import torch

    cuda = torch.cuda.is_available()
    available = torch.cuda.device_count() if cuda else 0
    if gpus is not None:
        if gpus < 1:
            raise HalluError(f"--gpus {gpus}: must be at least 1")
        if gpus > available:
            raise HalluError(
                f"--gpus {gpus}: this machine has {available} CUDA device(s)"
                + ("" if available else "; on a CPU machine use --nproc N")
            )
    if nproc is not None and nproc < 1:
        raise HalluError(f"--nproc {nproc}: must be at least 1")
    n = gpus or nproc or 1
    ds_config: Path | None = None
    accel_file: Path | None = None
    if accelerate_config:
        if accelerate_config in PACKAGED_CONFIGS:
            ds_config = packaged_config(accelerate_config)
        else:
            p = Path(accelerate_config)
            if not p.is_file():
                raise HalluError(
                    f"--accelerate-config {accelerate_config}: not one of {', '.join(PACKAGED_CONFIGS)} "
                    "and no such file (give a DeepSpeed .json or an accelerate .yaml)"
                )
            if p.suffix == ".json":
                ds_config = p.resolve()
            elif p.suffix in (".yaml", ".yml"):
                accel_file = p.resolve()
            else:
                raise HalluError(f"--accelerate-config {p}: expected a DeepSpeed .json or an accelerate .yaml file")
    elif n > 1:
        ds_config = packaged_config("zero3")
    if n == 1 and ds_config is None and accel_file is None:
        return None
    return {"processes": n, "deepspeed_config": ds_config, "accelerate_config_file": accel_file, "cpu": not cuda}


def launch_command(plan: dict, argv: list[str]) -> list[str]:
    """The ``accelerate launch`` command line that runs ``hallu <argv>`` as the planned ranks."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if plan["accelerate_config_file"] is not None:
        cmd += ["--config_file", str(plan["accelerate_config_file"])]
        if plan["processes"] > 1:
            cmd += ["--num_processes", str(plan["processes"])]
    else:
        cmd += ["--num_processes", str(plan["processes"]), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
        if plan["deepspeed_config"] is not None:
            cmd += ["--use_deepspeed", "--deepspeed_config_file", str(plan["deepspeed_config"])]
        elif plan["processes"] > 1:
            cmd += ["--multi_gpu"]
    cmd += ["--main_process_port", str(_free_port()), "-m", "hallu", *argv]
    return cmd


def launch_if_requested(gpus: int | None, nproc: int | None, accelerate_config: str | None,
                        argv: list[str] | None = None) -> None:
    """Run this command again under ``accelerate launch`` when asked to, then exit with its code.

    Returns (doing nothing) when no launch is needed or when this process already is a rank.
    """
    plan = plan_launch(gpus, nproc, accelerate_config)
    if plan is None:
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ)
    env["HALLU_LAUNCHED"] = "1"
    env[_CONFIG_ENV] = str(plan["deepspeed_config"]) if plan["deepspeed_config"] else "none"
    if plan["cpu"]:
        env.setdefault("DS_ACCELERATOR", "cpu")
        if plan["deepspeed_config"] is None:
            env["ACCELERATE_USE_CPU"] = "true"  # DDP over gloo; without it N lone runs (cpu-stack.md §5a)
    try:
        rc = subprocess.call(launch_command(plan, argv), env=env)
    except KeyboardInterrupt:
        rc = 130
    raise SystemExit(rc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
