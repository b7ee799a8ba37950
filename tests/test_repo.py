"""The repository's promises: CI runs what the README tells a new user to run."""

import re

from conftest import ROOT


def readme_blocks():
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_install_and_test_commands_word_for_word():
    ci = (ROOT / ".ci" / "run").read_text().split("\n")
    install = next(b for b in readme_blocks() if "pip install -r requirements.txt" in b).strip()
    test = next(b for b in readme_blocks() if "pytest" in b).strip()
    assert install in ci and test in ci


def test_ci_fails_loudly():
    assert "set -euo pipefail" in (ROOT / ".ci" / "run").read_text()


def test_torch_is_pinned_to_the_cpu_wheel():
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text().split("\n")
