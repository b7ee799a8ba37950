"""The repository's promises: CI runs what the README tells a new user to run."""

import re

from conftest import ROOT


def readme_blocks():
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_cpu_install_and_test_commands_word_for_word():
    ci = (ROOT / ".ci" / "run").read_text().split("\n")
    install = next(b for b in readme_blocks()
                   if "download.pytorch.org/whl/cpu" in b).strip().split("\n")
    test = next(b for b in readme_blocks() if "pytest" in b).strip()
    cpu_line = next(line for line in install if "download.pytorch.org/whl/cpu" in line)
    assert cpu_line in ci and test in ci


def test_ci_fails_loudly():
    assert "set -euo pipefail" in (ROOT / ".ci" / "run").read_text()


def test_every_requirement_is_pinned_or_bounded_above():
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().split("\n")]
    reqs = [line for line in lines if line and not line.startswith("#")]
    assert "torch==2.13.0" in reqs
    assert all("==" in r or "<" in r for r in reqs), [
        r for r in reqs if "==" not in r and "<" not in r]
