"""A FHIR report of one segmentation: a ``Bundle`` (type collection) built with ``fhir.resources``.

Contents: an ``ImagingStudy`` (the source study and series UIDs, and the DICOM-SEG series when
there is one), a ``DiagnosticReport`` (subject = the patient from the DICOM header, referencing the
ImagingStudy, the Observations, and carrying the DICOM-SEG and saliency files as attachments in
``presentedForm``), one volume ``Observation`` per label (mL, UCUM), a confidence Observation
(per-label confidence as components) and one Observation per QA flag, plus a "review needed"
Observation. Every resource is validated by fhir.resources as it is built.

FHIR version: R4B (``fhir.resources.R4B``): fhir.resources 8 ships R5, R4B and STU3, and R4B is
R4 with technical corrections only; the resources used here are the same in R4 and R4B.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from kubeseg.clinical.label_codes import LabelCode, default_label_code

UCUM = "http://unitsofmeasure.org"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
QA_SYSTEM = "urn:kubeseg:qa-flag"
_SYSTEMS = {"SCT": SNOMED, "DCM": DCM, "LN": LOINC}
VOLUME_CODE = {"system": SNOMED, "code": "118565006", "display": "Volume"}
_CATEGORY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                         "code": "imaging", "display": "Imaging"}]}


@dataclass
class ReportAttachment:
    """A file the report carries: its MIME type, title, and bytes (inline) or a URL."""

    content_type: str
    title: str
    data: Optional[bytes] = None
    url: Optional[str] = None


@dataclass
class ReportInput:
    """What the report says: identifiers from the DICOM header, model, results, QA."""

    identifiers: Mapping[str, str]  # dicom_io.patient_and_study()
    model: Mapping[str, str]  # name, version
    volumes_ml: Mapping[str, float]
    confidence: float
    qa: Mapping  # QAReport.to_json()
    label_codes: Mapping[str, LabelCode] = field(default_factory=dict)
    seg_series_uid: Optional[str] = None
    seg_sop_instance_uid: Optional[str] = None
    source_series: list[Mapping[str, str]] = field(default_factory=list)  # {uid, modality, number}
    attachments: list[ReportAttachment] = field(default_factory=list)


def _uid_identifier(uid: str) -> dict:
    return {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}


def _coding(code) -> dict:
    return {"system": _SYSTEMS.get(code.scheme, f"urn:dicom:scheme:{code.scheme}"), "code": code.value,
            "display": code.meaning}


def _finite(x) -> Optional[float]:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def build_report(inp: ReportInput, now: Optional[dt.datetime] = None):
    """The FHIR R4(B) Bundle (a ``fhir.resources`` model; ``.model_dump_json()`` to send it)."""
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    from fhir.resources.R4B.imagingstudy import ImagingStudy
    from fhir.resources.R4B.observation import Observation

    now = (now or dt.datetime.now(dt.timezone.utc)).replace(microsecond=0)
    ids = inp.identifiers
    subject = {"identifier": {"system": "urn:dicom:patient-id", "value": ids.get("patient_id") or "unknown"}}
    if ids.get("patient_name"):
        subject["display"] = ids["patient_name"].replace("^", " ").strip()
    method = {"text": f"{inp.model.get('name', 'kubeseg')} version {inp.model.get('version', '?')} (automatic)"}
    entries: list[tuple[str, object]] = []

    def add(resource) -> str:
        url = f"urn:uuid:{uuid.uuid4()}"
        entries.append((url, resource))
        return url

    series = [{"uid": s["uid"], "modality": {"system": DCM, "code": s.get("modality") or "OT"},
               **({"number": int(s["number"])} if str(s.get("number", "")).isdigit() else {})}
              for s in inp.source_series if s.get("uid")]
    if inp.seg_series_uid:
        seg_series = {"uid": inp.seg_series_uid, "modality": {"system": DCM, "code": "SEG"},
                      "description": "kubeseg segmentation"}
        if inp.seg_sop_instance_uid:
            seg_series["instance"] = [{"uid": inp.seg_sop_instance_uid,
                                       "sopClass": {"system": "urn:ietf:rfc:3986",
                                                    "code": "urn:oid:1.2.840.10008.5.1.4.1.1.66.4"}}]
        series.append(seg_series)
    study = ImagingStudy.model_validate({
        "resourceType": "ImagingStudy", "status": "available", "subject": subject,
        "identifier": [_uid_identifier(ids["study_instance_uid"])] if ids.get("study_instance_uid") else None,
        **({"series": series} if series else {}),
    })
    study_url = add(study)
    results = []
    for name, volume in inp.volumes_ml.items():
        code = inp.label_codes.get(name) or default_label_code(name)
        obs = Observation.model_validate({
            "resourceType": "Observation", "status": "preliminary", "category": [_CATEGORY],
            "code": {"coding": [VOLUME_CODE], "text": f"Volume of {name}"},
            "subject": subject, "effectiveDateTime": now.isoformat(), "method": method,
            "bodySite": {"coding": [_coding(code.type)], "text": name},
            "valueQuantity": {"value": round(float(volume), 4), "unit": "mL", "system": UCUM, "code": "mL"},
            "derivedFrom": [{"reference": study_url}],
        })
        results.append(add(obs))
    per_label = inp.qa.get("per_label_confidence", {})
    conf = Observation.model_validate({
        "resourceType": "Observation", "status": "preliminary", "category": [_CATEGORY],
        "code": {"coding": [{"system": QA_SYSTEM, "code": "confidence"}],
                 "text": "Segmentation confidence (mean top-class probability over the predicted foreground)"},
        "subject": subject, "effectiveDateTime": now.isoformat(), "method": method,
        "valueQuantity": {"value": round(float(inp.confidence), 6), "unit": "1", "system": UCUM, "code": "1"},
        "component": [{"code": {"text": f"Confidence of {k}"},
                       "valueQuantity": {"value": round(float(v), 6), "unit": "1", "system": UCUM, "code": "1"}}
                      for k, v in per_label.items()] or None,
    })
    results.append(add(conf))
    for f in inp.qa.get("flags", []):
        obs = {"resourceType": "Observation", "status": "preliminary", "category": [_CATEGORY],
               "code": {"coding": [{"system": QA_SYSTEM, "code": f["flag"]}], "text": f"QA flag: {f['flag']}"},
               "subject": subject, "effectiveDateTime": now.isoformat(), "valueBoolean": True,
               "interpretation": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                                               "code": "A", "display": "Abnormal"}]}],
               "note": [{"text": f["message"]}]}
        comps = []
        if _finite(f.get("value")) is not None:
            comps.append({"code": {"text": "value"}, "valueQuantity": {"value": _finite(f["value"])}})
        if _finite(f.get("threshold")) is not None:
            comps.append({"code": {"text": "threshold"}, "valueQuantity": {"value": _finite(f["threshold"])}})
        if f.get("label"):
            comps.append({"code": {"text": "label"}, "valueString": str(f["label"])})
        if comps:
            obs["component"] = comps
        results.append(add(Observation.model_validate(obs)))
    review = Observation.model_validate({
        "resourceType": "Observation", "status": "preliminary", "category": [_CATEGORY],
        "code": {"coding": [{"system": QA_SYSTEM, "code": "review-needed"}], "text": "Manual review needed"},
        "subject": subject, "effectiveDateTime": now.isoformat(), "valueBoolean": bool(inp.qa.get("flagged")),
    })
    results.append(add(review))
    forms = []
    for a in inp.attachments:
        att = {"contentType": a.content_type, "title": a.title, "creation": now.isoformat()}
        if a.data is not None:
            att["data"] = base64.b64encode(a.data).decode()
            att["size"] = len(a.data)
        if a.url:
            att["url"] = a.url
        forms.append(att)
    flags = sorted({f["flag"] for f in inp.qa.get("flags", [])})
    report = DiagnosticReport.model_validate({
        "resourceType": "DiagnosticReport", "status": "preliminary",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                                  "display": "Radiology"}]}],
        "code": {"coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}],
                 "text": "Automatic segmentation"},
        "subject": subject, "effectiveDateTime": now.isoformat(), "issued": now.isoformat(),
        "identifier": [{"system": "urn:dicom:accession-number", "value": ids["accession_number"]}]
        if ids.get("accession_number") else None,
        "imagingStudy": [{"reference": study_url}], "result": [{"reference": r} for r in results],
        "conclusion": ("QA flags: " + ", ".join(flags) + "; queued for manual review") if flags else "No QA flags",
        "presentedForm": forms or None,
    })
    report_url = add(report)
    entries.insert(0, entries.pop())  # the report first
    assert entries[0][0] == report_url
    return Bundle.model_validate({
        "resourceType": "Bundle", "type": "collection", "timestamp": now.isoformat(),
        "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"},
        "entry": [{"fullUrl": url, "resource": r.model_dump(mode="json", exclude_none=True)} for url, r in entries],
    })


def attachment_from_file(path: Path, content_type: str, title: str) -> ReportAttachment:
    return ReportAttachment(content_type, title, Path(path).read_bytes())
