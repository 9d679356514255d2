"""Every package the code imports is a direct dependency, declared in a ``.in`` list.

deptry (configured in pyproject.toml's ``[tool.deptry]``) reads the imports of glm_api/, tests/
and bench/ and reports any package that is not declared (DEP001) or that only arrives through
another package (DEP003): ``jsonschema`` came only with Ray, so the README's test command failed
on a fresh machine while CI, which installs Ray, passed (issue 21). Ray itself is declared in
requirements-ray.in and may be absent: deptry reads declarations, not what is installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The lists glm_api alone may import from: the server's, the optional Ray Serve one, the models'.
SERVER_LISTS = "requirements.in,requirements-ray.in,requirements-models.txt"


def deptry(*args: str) -> subprocess.CompletedProcess[str]:
    # requirements-parser warns that it skips the lists' -r/-c lines: each list is named itself.
    return subprocess.run([sys.executable, "-W", "ignore:Unused option:UserWarning", "-m", "deptry", "--no-ansi", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_every_import_in_the_code_tests_and_benchmarks_is_a_declared_dependency():
    result = deptry("glm_api", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_server_imports_only_what_its_own_lists_declare():
    # A package only in requirements-dev.in is missing from the Docker image and from the
    # README's server install: glm_api must not import it.
    result = deptry("glm_api", "--requirements-files", SERVER_LISTS)
    assert result.returncode == 0, result.stdout + result.stderr
