"""The client side of the service's review API (``kubeseg review queue``): plain HTTP, no web framework."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional

from kubeseg.errors import KubesegError

MAX_ANSWER = 16 * 2 ** 20


def fetch_queue(url: str, api_key: Optional[str] = None, limit: int = 100, status: Optional[str] = None,
                timeout: float = 30.0) -> list[dict]:
    """``GET <url>/review/queue``: the queued cases, in review order."""
    query = {"limit": str(limit), **({"status": status} if status else {})}
    request = urllib.request.Request(f"{url.rstrip('/')}/review/queue?{urllib.parse.urlencode(query)}",
                                     headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            body = r.read(MAX_ANSWER + 1)
    except urllib.error.HTTPError as e:
        detail = e.read(4096).decode("utf-8", "replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except (ValueError, AttributeError):
            pass
        raise KubesegError(f"{url}/review/queue answered {e.code}: {detail}") from None
    except OSError as e:
        raise KubesegError(f"cannot reach {url}: {e}") from None
    if len(body) > MAX_ANSWER:
        raise KubesegError(f"{url}/review/queue: the answer exceeds {MAX_ANSWER} bytes")
    return json.loads(body)["items"]


def queue_table(items: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Rows for a text table: id, confidence, flags, model version, status."""
    header = ["id", "confidence", "flags", "model", "status"]
    rows = []
    for i in items:
        conf = i.get("confidence")
        model = i.get("model") or {}
        version = str(model.get("version") or "-") + (f" ({model['semver']})" if model.get("semver") else "")
        rows.append([i["id"], f"{conf:.4f}" if isinstance(conf, (int, float)) else "-",
                     ",".join(i.get("qa_flags") or []) or "-", version, i.get("status", "pending")])
    return header, rows
