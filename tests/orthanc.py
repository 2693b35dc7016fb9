"""A real Orthanc PACS on loopback for tests (Debian's orthanc and orthanc-dicomweb)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom

from federation.ports import free_port

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def require_orthanc() -> None:
    """A missing PACS is a failure, not a skip: `.ci/run` installs it."""
    assert ORTHANC is not None and DICOMWEB_PLUGIN.exists(), (
        "Orthanc is not installed: apt-get install orthanc orthanc-dicomweb (as .ci/run does)"
    )


@dataclass(frozen=True)
class Pacs:
    """Where a running Orthanc listens."""

    http: int
    dicom: int

    @property
    def dicomweb(self) -> str:
        return f"dicomweb://127.0.0.1:{self.http}/dicom-web"

    @property
    def dimse(self) -> str:
        return f"dimse://ORTHANC@127.0.0.1:{self.dicom}"

    def c_store(self, folder: Path) -> int:
        """Upload every DICOM file under `folder`; returns how many Orthanc accepted."""
        from pynetdicom import AE

        files = sorted(folder.rglob("*.dcm"))
        ae = AE(ae_title="UPLOADER")
        for uid in sorted(
            {str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files}
        ):
            ae.add_requested_context(uid, pydicom.uid.ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", self.dicom, ae_title="ORTHANC")
        assert assoc.is_established, "Orthanc refused the C-STORE association"
        try:
            return sum(assoc.send_c_store(pydicom.dcmread(f)).Status == 0 for f in files)
        finally:
            assoc.release()


@contextlib.contextmanager
def running_orthanc(work: Path) -> Iterator[Pacs]:
    """Orthanc with the DICOMweb plugin on free ports, its store under `work`."""
    require_orthanc()
    pacs = Pacs(free_port(), free_port())
    config = {
        "Name": "medfed-test-pacs",
        "StorageDirectory": str(work / "db"),
        "IndexDirectory": str(work / "db"),
        "HttpPort": pacs.http,
        "DicomPort": pacs.dicom,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomModalities": {"medfed": ["MEDFED", "127.0.0.1", free_port()]},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (work / "orthanc.json").write_text(json.dumps(config))
    log_path = work / "orthanc.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([str(ORTHANC), str(work / "orthanc.json")], stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{pacs.http}/system", timeout=2)
                    break
                except OSError as err:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"Orthanc did not start: {log_path.read_text()[-2000:]}"
                        ) from err
                    time.sleep(0.3)
            yield pacs
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
