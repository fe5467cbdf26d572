"""The real ``kubeseg`` CLI on a broken dataset: ``dataset check`` reports every problem, and each
later step (fingerprint, plan, preprocess) refuses with the very same problem lines and leaves
nothing half-written behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kubeseg.synth import SynthSettings, synthesize

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
SHAPE = (12, 32, 32)
CONFIGURATION = "3d_fullres"


def kubeseg(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "kubeseg.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=180)


def problem_lines(stderr: str) -> list[str]:
    """The ``  - <problem>`` lines; progress bars share stderr and end their lines with ``\\r``."""
    return [line for line in re.split(r"[\r\n]", stderr) if line.startswith("  - ")]


def rewrite(path: Path, change) -> None:
    image = sitk.ReadImage(str(path))
    sitk.WriteImage(change(image), str(path), useCompression=True)


def _scaled_spacing(image: sitk.Image) -> sitk.Image:
    image.SetSpacing([s * 1.25 for s in image.GetSpacing()])
    return image


def _with_nan(image: sitk.Image) -> sitk.Image:
    a = sitk.GetArrayFromImage(image).astype(np.float32)
    a[1, 2, 3] = np.nan
    out = sitk.GetImageFromArray(a)
    out.CopyInformation(image)
    return out


def break_cases(raw: Path) -> list[tuple[str, str, str]]:
    """Two cases broken two ways, contents only (the layout stays valid); (case, file, what) each."""
    rewrite(raw / "labelsTr" / "synth_000.nii.gz", _scaled_spacing)
    rewrite(raw / "imagesTr" / "synth_002_0000.nii.gz", _with_nan)
    return [("synth_000", "labelsTr/synth_000.nii.gz", "spacing"), ("synth_002", "imagesTr/synth_002_0000.nii.gz", "NaN")]


def break_layout(raw: Path) -> list[tuple[str, str, str]]:
    (raw / "labelsTr" / "synth_001.nii.gz").unlink()
    return [("synth_001", "labelsTr/synth_001.nii.gz", "label file is missing")]


def break_dataset_json(raw: Path) -> list[tuple[str, str, str]]:
    d = json.loads((raw / "dataset.json").read_text())
    d["labels"] = {"background": 0, "body": [1, 2, 3], "organ": 2, "lesion": 3}
    (raw / "dataset.json").write_text(json.dumps(d))
    return [("", "dataset.json", "region")]


BREAKAGES = {"two cases": break_cases, "layout": break_layout, "dataset.json": break_dataset_json}


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict[str, Path]:
    """A valid CT dataset and the plans made from it (as a user would have them before breaking it)."""
    root = tmp_path_factory.mktemp("cli")
    raw = synthesize(root / "Dataset001_SynthCT", SynthSettings(kind="ct", num_cases=3, shape=SHAPE, seed=5))
    plans = root / "plans.json"
    r = kubeseg("plan", raw, "-o", plans, "--preset", "small", "-j", "1", cwd=root)
    assert r.returncode == 0, r.stderr
    return {"raw": raw, "plans": plans}


def test_valid_dataset_checks_ok(valid, tmp_path):
    r = kubeseg("dataset", "check", valid["raw"], "-j", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout and problem_lines(r.stderr) == []


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_every_step_refuses_a_broken_dataset_with_the_same_problems(valid, tmp_path, breakage):
    raw = Path(shutil.copytree(valid["raw"], tmp_path / "raw" / valid["raw"].name))
    broken = BREAKAGES[breakage](raw)
    data_identifier = json.loads(valid["plans"].read_text())["configurations"][CONFIGURATION]["data_identifier"]

    check = kubeseg("dataset", "check", raw, "-j", "2", cwd=tmp_path)
    assert check.returncode == 1, check.stderr
    expected = problem_lines(check.stderr)
    assert len(expected) == len(broken), check.stderr
    for line, (case, file, what) in zip(sorted(expected), sorted(broken)):
        assert str(raw / file) in line and what in line, line
        assert (f"case {case} " in line) if case else ("case " not in line), line

    fingerprint = tmp_path / "fp" / "fingerprint.json"
    plans = tmp_path / "plans" / "plans.json"
    out = tmp_path / "preprocessed"
    steps = {
        "fingerprint": ["fingerprint", raw, "-o", fingerprint, "-j", "1"],
        "plan": ["plan", raw, "-o", plans, "--preset", "small", "-j", "1"],
        "preprocess": ["preprocess", raw, "--plans", valid["plans"], "-c", CONFIGURATION, "-o", out, "-j", "2"],
    }
    for step, args in steps.items():
        r = kubeseg(*args, cwd=tmp_path)
        assert r.returncode == 1, f"{step} did not refuse the broken dataset (exit 1):\n{r.stdout}\n{r.stderr}"
        assert "Traceback" not in r.stderr, r.stderr
        assert problem_lines(r.stderr) == expected, f"{step}:\n{r.stderr}"

    # nothing half-written: no fingerprint, no plans, no arrays and no hidden staging folder
    assert not fingerprint.exists() and not fingerprint.with_name("fingerprint.cases.json").exists()
    assert not plans.exists()
    assert not (out / data_identifier).exists()
    leftovers = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert leftovers == [], leftovers


def test_failed_preprocess_keeps_the_previous_result(valid, tmp_path):
    """All-or-nothing: a run that fails leaves the arrays of the last good run exactly as they were."""
    raw = Path(shutil.copytree(valid["raw"], tmp_path / "raw" / valid["raw"].name))
    out = tmp_path / "preprocessed"
    args = ["preprocess", raw, "--plans", valid["plans"], "-c", CONFIGURATION, "-o", out, "-j", "1"]
    r = kubeseg(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    before = {p.relative_to(out): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*")) if p.is_file()}
    assert any(p.name == "synth_002.npy" for p in before)

    break_cases(raw)
    r = kubeseg(*args, cwd=tmp_path)
    assert r.returncode != 0 and len(problem_lines(r.stderr)) == 2, r.stderr
    after = {p.relative_to(out): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
