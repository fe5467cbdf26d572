"""A small trained bundle for the service tests."""

from __future__ import annotations

from pathlib import Path

from tests.pipelines.helpers import tiny_bundle

# Long enough that the network finds the body (the intensity drift check looks inside the
# predicted foreground), short enough for CI: about a minute on 2 cores.
SERVICE_SCHEDULE = (8, 16, 2)


def served_bundle(root: Path, schedule=SERVICE_SCHEDULE) -> dict:
    """Raw synthetic CT → plans (small preset) → 3d_fullres fold 0 → selection → bundle."""
    return tiny_bundle(root, schedule)
