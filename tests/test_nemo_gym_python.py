"""Finding a Python >= 3.12 for NeMo Gym's venv: every candidate is run, so a pyenv shim that exits 127
(pyenv's global version is not the one it names) or an older interpreter is skipped."""

from __future__ import annotations

import os
import stat
import sys

import pytest

from sglgym.rollout.nemo_gym import find_python312, python_candidates, python_version


def _script(path, body: str) -> str:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_broken_shims_and_old_pythons_are_skipped(tmp_path):
    shim = _script(tmp_path / "python3.12", 'echo "pyenv: python3.12: command not found" >&2; exit 127')
    old = _script(tmp_path / "python3.11", 'echo "3 11"')
    good = _script(tmp_path / "python3.13", 'echo "3 13"')
    assert python_version(shim) is None and python_version(old) == (3, 11)
    assert python_version(str(tmp_path / "missing")) is None
    assert find_python312([shim, old, str(tmp_path / "missing"), good]) == good
    assert find_python312([shim, old]) is None
    assert python_version(sys.executable) == sys.version_info[:2]


def test_pyenv_installs_come_before_path_shims(tmp_path, monkeypatch):
    root = tmp_path / "pyenv"
    for v in ("3.13.0", "3.12.1", "3.9.18"):
        (root / "versions" / v / "bin").mkdir(parents=True)
        _script(root / "versions" / v / "bin" / "python3", f'echo "{v.replace(".", " ", 1).rsplit(".", 1)[0]}"')
    shims = tmp_path / "shims"
    shims.mkdir()
    _script(shims / "python3.12", "exit 127")
    monkeypatch.setenv("PYENV_ROOT", str(root))
    monkeypatch.setenv("PATH", f"{shims}:{os.environ['PATH']}")
    monkeypatch.delenv("SGLGYM_PYTHON312", raising=False)
    found = python_candidates()
    installs = [str(root / "versions" / v / "bin" / "python3") for v in ("3.9.18", "3.12.1", "3.13.0")]
    assert found[:3] == installs and found.index(str(shims / "python3.12")) > 2
    assert find_python312() == installs[1]          # the 3.9 install answers 3.9, the shim is never needed


def test_this_machine_has_a_python_for_nemo_gym():
    """On CI a missing Python >= 3.12 must fail loudly (the NeMo Gym tests would otherwise skip)."""
    found = find_python312()
    if found is None and not os.environ.get("CI"):
        pytest.skip("no Python >= 3.12 on this machine (set SGLGYM_PYTHON312); CI fails here instead")
    assert found is not None, f"no Python >= 3.12 among {python_candidates()}"
    assert python_version(found) >= (3, 12)
