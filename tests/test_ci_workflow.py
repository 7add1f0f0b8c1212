"""docs/ci.md's GitHub Actions workflow is valid: extracted from the doc and checked with actionlint."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def actionlint() -> str | None:
    return shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")


def workflow() -> str:
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "ci.md").read_text(), re.S)
    assert len(blocks) == 1, "docs/ci.md should hold exactly one workflow"
    return blocks[0]


def test_documented_workflow_passes_actionlint(tmp_path):
    exe = actionlint()
    if exe is None:
        pytest.fail("actionlint is not installed (it is in the test extras: make test installs it)")
    wf = tmp_path / ".github" / "workflows" / "reproducibility.yml"
    wf.parent.mkdir(parents=True)
    wf.write_text(workflow())
    p = subprocess.run([exe, "-no-color", str(wf)], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr


def test_actionlint_catches_what_the_old_workflow_got_wrong(tmp_path):
    """The check can fail: `runner.temp` in a job-level env (as the earlier doc had it) is refused."""
    exe = actionlint()
    if exe is None:
        pytest.fail("actionlint is not installed")
    bad = workflow().replace("    env:\n", "    env:\n      PROVENANCE_KEY: ${{ runner.temp }}/keys/ci.key\n", 1)
    wf = tmp_path / ".github" / "workflows" / "bad.yml"
    wf.parent.mkdir(parents=True)
    wf.write_text(bad)
    p = subprocess.run([exe, "-no-color", str(wf)], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode != 0 and "runner" in p.stdout, p.stdout


def test_workflow_has_no_arm_runner_while_the_recipe_pins_avx2():
    assert "arm" not in workflow().lower() or "ubuntu-24.04-arm" not in workflow()
    assert 'cpu_capability = "avx2"' in (ROOT / "recipes" / "ptrace-0.9.9-debugger.toml").read_text()
