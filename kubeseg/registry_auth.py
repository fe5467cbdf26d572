"""Accounts of an authenticated MLflow registry (``mlflow server --app-name basic-auth``).

The chart runs MLflow with its basic-auth app: every request but ``/health`` needs a user, and
``default_permission = READ`` lets a signed-in user read but not write what others created.
This bootstrap, run with the admin's credentials (``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` from
the admin Secret) by the chart's hook Job, makes the two machine accounts idempotently:

- the **writer** (pipelines: register versions, move aliases): ``MANAGE`` on the registered model;
- the **reader** (the segmentation service, the trigger): ``READ`` on it, nothing else.

``python -m kubeseg.registry_auth --model NAME --writer USER:PASSWORD_FILE --reader USER:PASSWORD_FILE``
(passwords from files, as Secrets are mounted; an existing user's password is reset to the file's).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional

from kubeseg.tracking import tracking_uri

log = logging.getLogger(__name__)


def _account(spec: str) -> tuple[str, str]:
    user, sep, path = spec.partition(":")
    if not sep or not user:
        raise SystemExit(f"expected USER:PASSWORD_FILE, got {spec!r}")
    password = Path(path).read_text().strip()
    if len(password) < 12:
        raise SystemExit(f"the password of {user} ({path}) is shorter than 12 characters")
    return user, password


def ensure_user(auth, username: str, password: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        auth.get_user(username)
        auth.update_user_password(username, password)
    except MlflowException:
        auth.create_user(username, password)


def bootstrap(model: str, writer: tuple[str, str], reader: Optional[tuple[str, str]] = None,
              uri: Optional[str] = None) -> None:
    """Create/refresh the accounts and grant them ``model`` (created if needed). Needs admin credentials."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(uri)
    auth = AuthServiceClient(uri)
    client = MlflowClient(uri)
    try:
        client.get_registered_model(model)
    except MlflowException:
        client.create_registered_model(model, description="kubeseg segmentation bundles (nnU-Net v2 layout)")
    grants = [(writer, "MANAGE")] + ([(reader, "READ")] if reader else [])
    for (user, password), permission in grants:
        ensure_user(auth, user, password)
        auth.grant_user_permission(user, "registered_model", model, permission)
        log.info("%s: %s on registered model %s", user, permission, model)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kubeseg.registry_auth", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--writer", required=True, help="USER:PASSWORD_FILE of the pipelines' account")
    p.add_argument("--reader", default=None, help="USER:PASSWORD_FILE of the service's account")
    p.add_argument("--tracking-uri", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    bootstrap(a.model, _account(a.writer), _account(a.reader) if a.reader else None, a.tracking_uri)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
