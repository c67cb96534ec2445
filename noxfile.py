"""nox sessions: tests, lowest, lint, demo, bench. Each installs the CPU torch wheel first (see README)."""

import re
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
TORCH = "torch==2.13.0"


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (offline, CPU)."""
    session.install(TORCH)
    session.install("-e", ".[dev]")
    session.run("python", "-m", "pytest", "-q", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


def lower_bounds() -> list[str]:
    """Every dependency of pyproject.toml pinned to its lower bound ("transformers>=5.24.0,<5.25" ->
    "transformers==5.24.0"); torch is left out (TORCH is installed first)."""
    import tomllib

    deps = tomllib.loads(Path(__file__).with_name("pyproject.toml").read_text())["project"]["dependencies"]
    pins = []
    for dep in deps:
        name, low = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", dep).groups()
        if name != "torch":
            pins.append(f"{name}=={low}")
    return pins


@nox.session
def lowest(session: nox.Session) -> None:
    """The test suite on exactly the lowest versions pyproject.toml admits (torch: the tested CPU wheel)."""
    session.install(TORCH)
    session.install(*lower_bounds(), "pytest>=8")
    session.install("--no-deps", "-e", ".")
    session.run("pip", "check")
    session.run("python", "-m", "pytest", "-q", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff on the whole tree."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")


@nox.session
def demo(session: nox.Session) -> None:
    """`hallu demo`: the whole loop on the offline shapes world (report in runs/demo; a rerun resumes).

    `nox -s demo -- --quick` runs the small variant; any flag after `--` goes to `hallu demo`."""
    session.install(TORCH)
    session.install(".")
    session.run("hallu", "demo", "--out", "runs/demo", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """Speed benchmarks (print ratios against their baselines)."""
    session.install(TORCH)
    session.install("-e", ".")
    session.run("python", "benchmarks/pope_speed.py", *session.posargs, env={"HF_HUB_OFFLINE": "1"})
