"""Install truth: the project venv imports every kubeseg module with only kubeseg's declared
dependencies, and nothing in it can hide a missing one.

A green suite once hid an undeclared dependency (acvl-utils, imported by batchgeneratorsv2)
because the test extra installed nnunetv2, which brought it along. So: nnunetv2 must not be
importable here (it lives in .venv-oracle), every module is imported in a fresh interpreter of
this venv, and every third-party package that kubeseg's source imports is declared by kubeseg
itself (not merely present because another package pulled it in).
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("kubeseg", "components", "pipelines", "services")
# the engine may import only the core dependencies; these modules are the registry glue (MLflow)
REGISTRY_GLUE = {"kubeseg/registry.py", "kubeseg/tracking.py", "kubeseg/registry_auth.py"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0])


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    extras = {k: {_requirement_name(r) for r in v} for k, v in project.get("optional-dependencies", {}).items()}
    return core, extras


def _third_party_imports(top_level_only: bool = False) -> dict[str, set[str]]:
    """Top-level module name -> files of kubeseg's packages that import it (absolute imports).
    ``top_level_only``: imports that run when the module is imported (not inside a function)."""
    std = set(sys.stdlib_module_names) | {"__future__", *PACKAGES}
    found: dict[str, set[str]] = {}
    for top in PACKAGES:
        for f in sorted((REPO / top).rglob("*.py")):
            tree = ast.parse(f.read_text(encoding="utf-8"))
            nodes = ast.walk(tree)
            if top_level_only:  # module body, including if/try blocks, but not functions or classes
                nodes, todo = [], list(tree.body)
                while todo:
                    n = todo.pop()
                    nodes.append(n)
                    if isinstance(n, (ast.If, ast.Try, ast.With)):
                        todo += [c for c in ast.iter_child_nodes(n) if isinstance(c, ast.stmt)]
            for node in nodes:
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                         else [])
                for name in names:
                    if name.split(".")[0] not in std:
                        found.setdefault(name.split(".")[0], set()).add(f.relative_to(REPO).as_posix())
    return found


def test_oracle_is_not_in_the_project_venv():
    assert importlib.util.find_spec("nnunetv2") is None, (
        "nnunetv2 is importable from the project venv: it can mask missing dependencies; "
        "it belongs in .venv-oracle (make oracle)")


def test_every_module_imports_in_a_fresh_interpreter():
    code = f"""
import importlib, json, pkgutil, traceback
done, failed = [], {{}}
for top in {list(PACKAGES)!r}:
    pkg = importlib.import_module(top)
    for info in pkgutil.walk_packages(pkg.__path__, top + "."):
        try:
            importlib.import_module(info.name)
            done.append(info.name)
        except BaseException as e:
            failed[info.name] = traceback.format_exception_only(type(e), e)[-1].strip()
print(json.dumps({{"done": done, "failed": failed}}))
"""
    # no inherited KUBESEG_* settings; the service module reads its settings at import and needs
    # a model source named (as `bentoml build` does), not a reachable one.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBESEG_")}
    # Auth and signatures are off explicitly here: importing is the point, not serving.
    env.update(KUBESEG_MODEL_NAME="install-check", KUBESEG_AUTH="disabled", KUBESEG_MODEL_SIGNATURES="disabled",
               PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         encoding="utf-8", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["failed"] == {}
    for must in ("kubeseg.training.trainer", "kubeseg.training.augmentation", "components.steps",
                 "pipelines.training", "services.service", "services.trigger"):
        assert must in report["done"]


def test_every_third_party_import_is_declared_by_kubeseg():
    core, extras = _declared()
    everything = core.union(*extras.values())
    dists = md.packages_distributions()
    undeclared, engine_beyond_core = {}, {}
    for module, files in sorted(_third_party_imports().items()):
        if not {_norm(d) for d in dists.get(module, [module])} & everything:
            undeclared[module] = sorted(files)
    # importing the engine needs the core dependencies only; a feature may import an extra's
    # package lazily (the S3 checkpoint store: boto3 from the pipelines extra)
    for module, files in sorted(_third_party_imports(top_level_only=True).items()):
        engine_files = [f for f in files if f.startswith("kubeseg/") and f not in REGISTRY_GLUE]
        if engine_files and not {_norm(d) for d in dists.get(module, [module])} & core:
            engine_beyond_core[module] = engine_files
    assert undeclared == {}, "imported but not declared in pyproject.toml (only present through another package)"
    assert engine_beyond_core == {}, "the engine imports a package that is not a core dependency"
