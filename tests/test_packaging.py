"""The wheel: commands/, evals/ and data/ install inside the hallu namespace, nothing generic at top level."""

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True)
    (whl,) = out.glob("hallu-*.whl")
    return whl


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("hallu-")}
    assert tops == {"hallu"}, f"only the hallu package may land in site-packages, got {sorted(tops)}"
    for expected in ("hallu/commands/__init__.py", "hallu/evals/__init__.py", "hallu/data/__init__.py",
                     "hallu/data/shapes.py", "hallu/engine.py", "hallu/manifest.py"):
        assert expected in names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "hallu = hallu.commands:main" in entry


def test_installed_wheel_imports_namespaced_packages_only(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    def run(code):
        return subprocess.run([str(py), "-c", code], cwd=outside, capture_output=True, text=True)

    from hallu import __version__

    ok = run("import hallu, hallu.evals, hallu.data, hallu.judges; print(hallu.__version__, hallu.evals.__file__)")
    version, where = ok.stdout.split()
    assert version == __version__ and where.startswith(str(env_dir)) and where.endswith("hallu/evals/__init__.py")
    for bare in ("evals", "data", "commands"):
        r = run(f"import {bare}")
        assert r.returncode != 0 and f"No module named '{bare}'" in r.stderr
    shipped = run("import importlib.resources as r; print(r.files('hallu.data').joinpath('shapes.py').is_file())")
    assert shipped.stdout.strip() == "True"
