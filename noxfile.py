"""Entry points: ``nox -s demo``, ``nox -s tests``, ``lint``, ``typecheck``, ``bench``, ``sim``."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PACKAGES = ["-e", "./common", "-e", "./tracker", "-e", "./proxy", "-e", "./agent"]
TEST_DEPS = [
    "pytest>=8",
    "pytest-trio>=0.8",
    "hypothesis>=6.100",
    "libtorrent>=2.1,<2.2",
    "helm-python-sdk>=0.2",
    "kubernetes-validate>=1.30",
    "cryptography>=42",
    "selenium>=4.20",  # drives Debian's chromium for the agent's status page
    "matplotlib>=3.8",  # the simulator's plots (tests/sim/plots.py)
]
LINT_DEPS = ["ruff>=0.6", "import-linter>=2.0"]
TYPE_DEPS = [
    "mypy>=1.10",
    "types-PyYAML",
    "pytest>=8",
    "hypothesis>=6.100",
    "selenium>=4.20",
    "matplotlib>=3.8",
]


def _real_parts(session: nox.Session) -> None:
    """The third-party programs tests and demo drive (apt); fails loudly if it cannot."""
    session.run("bash", "tests/install-real-parts.sh", external=True)


@nox.session
def lint(session: nox.Session) -> None:
    session.install(*LINT_DEPS, *PACKAGES)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("lint-imports")  # architecture contracts in pyproject.toml


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install(*TYPE_DEPS, *PACKAGES)
    session.run("mypy")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite: unit, property, component, interop and integration tests with real parts."""
    _real_parts(session)
    session.install(*TEST_DEPS, *PACKAGES)
    session.run("pytest", *(session.posargs or ["tests"]))


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: numbers and ratios against a baseline measured in the same run."""
    _real_parts(session)
    session.install(*TEST_DEPS, *PACKAGES)
    session.run("python", "-m", "tests.bench", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Origin, tracker, 2 proxies, 6 agents on this machine; pull an image through all agents."""
    session.run("bash", "tests/install-real-parts.sh", "--demo", external=True)
    session.install(*PACKAGES)
    session.run("python", "-m", "tests.demo", *session.posargs)


@nox.session
def sim(session: nox.Session) -> None:
    """The swarm simulator (docs/scale.md): a rollout in virtual time on the engine's own
    cores. Without arguments a small one (16 nodes, 25 Mbit/s, a warm 100 MB image, a few
    seconds); ``nox -s sim -- --nodes 500 --size-mb 200 ...`` runs any other."""
    session.install(*PACKAGES, "matplotlib>=3.8")
    default = ["--nodes", "16", "--size-mb", "100", "--layers", "1", "--rate", "25"]
    session.run("python", "-m", "tests.sim", *(session.posargs or [*default, "--origin-rate", "0"]))
