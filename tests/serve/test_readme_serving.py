"""The README's serving section, as written: `serve run serve/config.yaml`, then curl, then the openai snippet."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.e2e  # `make test-e2e`: own clusters, servers or builds

ROOT = Path(__file__).resolve().parents[2]


def readme_block(after: str, lang: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(after):]
    return re.search(rf"```{lang}\n(.*?)```", section, re.S)[1]


@pytest.mark.timeout(420)
def test_serve_run_config_then_curl_and_openai_as_in_the_readme(tmp_path):
    assert "serve run serve/config.yaml" in readme_block("### Serve", "bash")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HF_HUB_OFFLINE": "1"}
    bin_dir = Path(sys.executable).parent
    proc = subprocess.Popen([str(bin_dir / "serve"), "run", "serve/config.yaml"], cwd=ROOT, env=env,
                            stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if requests.get("http://127.0.0.1:8000/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(2)
        else:
            pytest.fail("serve run did not come up: " + (tmp_path / "serve.log").read_text()[-3000:])
        curl = readme_block("Then ask it", "bash")
        out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "Paris" in out.stdout, out.stdout + out.stderr
        snippet = readme_block("or from Python", "python")
        out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "Paris" in out.stdout, out.stdout + out.stderr
        snippet = readme_block("**Structured outputs.**", "python")
        out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "name='Paris'" in out.stdout, out.stdout + out.stderr
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # serve run shuts the application down on Ctrl-C
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
