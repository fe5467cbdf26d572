"""A small DICOMweb client (QIDO-RS, WADO-RS, STOW-RS) over ``requests``.

Only what the PACS round trip needs: find series of a study (QIDO-RS JSON), fetch a series'
instances (WADO-RS ``multipart/related; type="application/dicom"``) into files, store
instances (STOW-RS). Responses are size-bounded (``max_bytes``) while they stream, and every
fetched part is written to its own file, then judged by :mod:`kubeseg.clinical.dicom_io`'s
header checks before pixels are read.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import requests

from kubeseg.errors import KubesegError

DICOM_JSON = "application/dicom+json"


class DicomWebError(KubesegError):
    pass


@dataclass
class DicomWebClient:
    """``url``: the DICOMweb root (Orthanc: ``http://host:8042/dicom-web``)."""

    url: str
    timeout: float = 60.0
    max_bytes: int = 2 * 1024 ** 3
    auth: Optional[tuple[str, str]] = None
    headers: Optional[dict] = None

    def _get(self, path: str, accept: str, params: Optional[dict] = None, stream: bool = False) -> requests.Response:
        url = f"{self.url.rstrip('/')}/{path.lstrip('/')}"
        try:
            r = requests.get(url, params=params, headers={"Accept": accept, **(self.headers or {})},
                             timeout=self.timeout, stream=stream, auth=self.auth)
        except requests.RequestException as e:
            raise DicomWebError(f"DICOMweb GET {url} failed: {e}") from None
        if r.status_code == 204:
            return r
        if r.status_code >= 400:
            raise DicomWebError(f"DICOMweb GET {url} answered {r.status_code}: {r.text[:300]}")
        return r

    # -- QIDO-RS -----------------------------------------------------------------------------------
    def search_series(self, study_uid: str, **filters: str) -> list[dict]:
        """Series of a study as DICOM JSON (``{"0020000E": {"vr": "UI", "Value": [...]}, ...}``)."""
        r = self._get(f"studies/{study_uid}/series", DICOM_JSON, params=filters or None)
        return [] if r.status_code == 204 or not r.content else r.json()

    @staticmethod
    def value(item: dict, tag: str) -> Optional[str]:
        v = item.get(tag, {}).get("Value")
        return str(v[0]) if v else None

    # -- WADO-RS -----------------------------------------------------------------------------------
    def retrieve_series(self, study_uid: str, series_uid: str, folder: Path) -> list[Path]:
        """Every instance of a series written as ``folder/<n>.dcm``."""
        r = self._get(f"studies/{study_uid}/series/{series_uid}",
                      'multipart/related; type="application/dicom"', stream=True)
        ctype = r.headers.get("Content-Type", "")
        m = re.search(r'boundary="?([^";]+)"?', ctype)
        if not ctype.startswith("multipart/related") or not m:
            raise DicomWebError(f"WADO-RS answered {ctype!r}, not multipart/related with a boundary")
        body = bytearray()
        for chunk in r.iter_content(1 << 20):
            body += chunk
            if len(body) > self.max_bytes:
                r.close()
                raise DicomWebError(f"series {series_uid}: the WADO-RS answer exceeds {self.max_bytes} bytes")
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for i, part in enumerate(_split_multipart(bytes(body), m.group(1).encode())):
            path = folder / f"{i:05d}.dcm"
            path.write_bytes(part)
            written.append(path)
        if not written:
            raise DicomWebError(f"series {series_uid} of study {study_uid}: WADO-RS returned no instance")
        return written

    # -- STOW-RS -----------------------------------------------------------------------------------
    def store(self, files: Iterable[Path], study_uid: Optional[str] = None) -> dict:
        """Store DICOM files; returns the STOW-RS response (DICOM JSON), raising on failures."""
        boundary = uuid.uuid4().hex
        body = bytearray()
        for f in files:
            body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            body += Path(f).read_bytes() + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        url = f"{self.url.rstrip('/')}/studies" + (f"/{study_uid}" if study_uid else "")
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                   "Accept": DICOM_JSON, **(self.headers or {})}
        try:
            r = requests.post(url, data=bytes(body), headers=headers, timeout=self.timeout, auth=self.auth)
        except requests.RequestException as e:
            raise DicomWebError(f"STOW-RS {url} failed: {e}") from None
        answer = r.json() if r.content and "json" in r.headers.get("Content-Type", "") else {}
        failed = answer.get("00081198", {}).get("Value") if isinstance(answer, dict) else None
        if r.status_code >= 400 or failed:
            raise DicomWebError(f"STOW-RS {url} answered {r.status_code}; failed instances: {failed or r.text[:300]}")
        return answer


def _split_multipart(body: bytes, boundary: bytes) -> list[bytes]:
    """The payloads of a multipart body (headers of each part dropped)."""
    parts = []
    delimiter = b"--" + boundary
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        if payload.endswith(b"\r\n"):
            payload = payload[:-2]
        parts.append(payload)
    return parts
