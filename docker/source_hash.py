"""Prints the hash of what the kubeseg image is built from: the Dockerfile, pyproject.toml and
every file of the kubeseg, components, pipelines and services packages (README and caches left
out). `make image-cpu` stores it as the image label `org.kubeseg.source`; tests/test_image.py
compares it with the checkout's, so that a stale image is not mistaken for this checkout's."""

import hashlib
import sys
from pathlib import Path

LABEL = "org.kubeseg.source"
FILES = ("Dockerfile", "pyproject.toml")
PACKAGES = ("kubeseg", "components", "pipelines", "services")


def source_hash(root: Path) -> str:
    paths = [root / f for f in FILES]
    for pkg in PACKAGES:
        paths += [p for p in (root / pkg).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


if __name__ == "__main__":
    print(source_hash(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]))
