"""nox sessions: tests, lint, demo, bench. Each installs the CPU torch wheel first (see README)."""

import nox

nox.options.sessions = ["lint", "tests"]
TORCH = "torch==2.13.0"


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (offline, CPU)."""
    session.install(TORCH)
    session.install("-e", ".[dev]")
    session.run("python", "-m", "pytest", "-q", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff on the whole tree."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")


@nox.session
def demo(session: nox.Session) -> None:
    """`hallu demo`: the whole loop on the offline shapes world."""
    session.install(TORCH)
    session.install(".")
    session.run("hallu", "demo", "--out", str(session.create_tmp()) + "/demo", env={"HF_HUB_OFFLINE": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """Speed benchmarks (print ratios against their baselines)."""
    session.install(TORCH)
    session.install("-e", ".")
    session.run("python", "benchmarks/pope_speed.py", *session.posargs, env={"HF_HUB_OFFLINE": "1"})
