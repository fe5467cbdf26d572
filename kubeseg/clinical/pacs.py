"""``kubeseg pacs segment``: a study from a PACS, segmented, its DICOM-SEG stored back.

QIDO-RS lists the study's series; the image series (not SEG, SR, PR ...) are fetched by WADO-RS
into a temporary folder; :class:`~kubeseg.clinical.dicom_predict.DicomSegmenter` maps them to the
model's channels and segments; the DICOM-SEG is stored by STOW-RS under the same study. The
other outputs (NIfTI, summary, FHIR report) stay in the output folder.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from kubeseg.clinical.dicom_predict import DicomOutputs, DicomSegmenter
from kubeseg.clinical.dicomweb import DicomWebClient, DicomWebError

log = logging.getLogger(__name__)
NON_IMAGE_MODALITIES = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "REG", "DOC", "RTPLAN", "RTDOSE"}
SERIES_UID, MODALITY, DESCRIPTION = "0020000E", "00080060", "0008103E"


@dataclass
class PacsResult:
    outputs: DicomOutputs
    fetched_series: list[str]
    stored: dict


def segment_study(client: DicomWebClient, segmenter: DicomSegmenter, study_uid: str, out_dir: Path,
                  series: Optional[Sequence[str]] = None, mapping: Optional[Mapping[str, str]] = None,
                  saliency: bool = False, store: bool = True) -> PacsResult:
    """Fetch (WADO-RS), segment, store the DICOM-SEG (STOW-RS)."""
    found = client.search_series(study_uid)
    if not found:
        raise DicomWebError(f"study {study_uid}: QIDO-RS finds no series")
    wanted = []
    for item in found:
        uid, modality = client.value(item, SERIES_UID), (client.value(item, MODALITY) or "").upper()
        if uid and (uid in series if series else modality not in NON_IMAGE_MODALITIES):
            wanted.append(uid)
    if not wanted:
        raise DicomWebError(f"study {study_uid}: no image series to segment among "
                            f"{[(client.value(i, SERIES_UID), client.value(i, MODALITY)) for i in found]}")
    with tempfile.TemporaryDirectory(prefix="kubeseg-pacs-") as tmp:
        for uid in wanted:
            client.retrieve_series(study_uid, uid, Path(tmp) / uid)
        outputs = segmenter.run(Path(tmp), Path(out_dir), mapping, saliency=saliency)
    stored = client.store([outputs.dicom_seg], study_uid) if store else {}
    log.info("study %s: segmented %s, DICOM-SEG %s stored", study_uid, wanted, outputs.seg_series_uid)
    return PacsResult(outputs, wanted, stored)
