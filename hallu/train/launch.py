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


def _strip_launch_options(argv: list[str]) -> list[str]:
    """``argv`` without --gpus/--nproc/--accelerate-config (the ranks must not launch again)."""
    drop = ("--gpus", "--nproc", "--accelerate-config")
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in drop:
            skip = True
            continue
        if a.startswith(tuple(d + "=" for d in drop)):
            continue
        out.append(a)
    return out


def launcher_args(plan: dict) -> list[str]:
    """The ``accelerate launch`` arguments that select DeepSpeed (or the user's accelerate config)."""
    if plan["accelerate_config_file"] is not None:
        return ["--config_file", str(plan["accelerate_config_file"])]
    if plan["deepspeed_config"] is not None:
        return ["--use_deepspeed", "--deepspeed_config_file", str(plan["deepspeed_config"])]
    return []


def launch_if_requested(
    gpus: int | None, nproc: int | None, accelerate_config: str | None, argv: list[str] | None = None
) -> None:
    """Run this command again as the planned ranks (``hallu.distributed.relaunch``), then exit 0.

    Returns (doing nothing) when no launch is needed or when this process already is a rank. A rank
    that fails surfaces here as one HalluError line (the relaunch keeps only the first rank's error).
    """
    plan = plan_launch(gpus, nproc, accelerate_config)
    if plan is None:
        return
    from hallu import distributed

    argv = _strip_launch_options(list(sys.argv[1:] if argv is None else argv))
    env = {"HALLU_LAUNCHED": "1", _CONFIG_ENV: str(plan["deepspeed_config"]) if plan["deepspeed_config"] else "none"}
    if plan["cpu"]:
        env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
    counts = {"gpus": plan["processes"]} if not plan["cpu"] else {"nproc": plan["processes"]}
    distributed.relaunch(argv, launcher_args=launcher_args(plan), env=env, **counts)
    raise SystemExit(0)
