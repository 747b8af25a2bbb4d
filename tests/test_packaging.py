"""The package as users install it: a wheel, not the source tree, must still build raypress's CPU kernels."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # `make test-e2e`: own clusters, servers or builds

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_the_wheel_ships_every_kernel_source_and_builds_the_kernels(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("raypress-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    sources = {f"compress/csrc/{p.name}" for p in (ROOT / "compress" / "csrc").iterdir() if p.is_file()}
    assert sources <= shipped, sorted(sources - shipped)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # run from elsewhere, the installed copy first on the path: the source tree is not importable
    code = "import compress, compress.kernels as k; print(compress.__file__); print(k.kernels_available())"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=500)
    where, available = out.stdout.split()[-2:]
    assert where.startswith(str(target)) and available == "True", out.stdout + out.stderr[-3000:]
