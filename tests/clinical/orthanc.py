"""A real Orthanc PACS (Debian's ``orthanc`` + ``orthanc-dicomweb``) on a free port with temp storage."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.pipelines.helpers import free_port

DICOMWEB_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins")


def orthanc_available() -> str:
    """Why Orthanc cannot run here, or '' when it can."""
    if shutil.which("Orthanc") is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    if not any((Path(d) / "libOrthancDicomWeb.so").is_file() for d in DICOMWEB_PLUGIN_DIRS):
        return "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return ""


class Orthanc:
    """``with Orthanc(tmp) as pacs: pacs.dicomweb`` — started with a generated config, stopped on exit."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.proc = None

    def __enter__(self) -> "Orthanc":
        self.root.mkdir(parents=True, exist_ok=True)
        plugin = next(str(Path(d) / "libOrthancDicomWeb.so") for d in DICOMWEB_PLUGIN_DIRS
                      if (Path(d) / "libOrthancDicomWeb.so").is_file())
        config = {
            "Name": "kubeseg-test", "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"), "HttpPort": self.port, "DicomServerEnabled": False,
            "DicomPort": free_port(), "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "HttpTimeout": 60, "StorageCompression": False, "ConcurrentJobs": 1, "HttpThreadsCount": 4,
        }
        (self.root / "orthanc.json").write_text(json.dumps(config))
        self.log = open(self.root / "orthanc.log", "w")
        self.proc = subprocess.Popen(["Orthanc", str(self.root / "orthanc.json")], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("Orthanc exited:\n" + (self.root / "orthanc.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{self.url}/system", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.__exit__(None, None, None)
        raise RuntimeError("Orthanc did not answer within 60 s:\n" + (self.root / "orthanc.log").read_text()[-3000:])

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
