"""Coded concepts per label: what a DICOM-SEG segment and a FHIR Observation say a label *is*.

A bundle carries ``label_codes.json`` (label name → category and type, each a code value, its
coding scheme and meaning). It is written at bundle time with :func:`default_label_codes`, and a
person may edit it. The default for a label name is its SNOMED CT concept when pydicom's code
dictionary knows the name (``liver`` → SCT 10200004 Liver; else its last known word: ``left_kidney`` → Kidney), with
category "Anatomical Structure", or "Morphologically Abnormal Structure" for lesion words; any
other name gets the generic type SCT 85756007 "Tissue". Labels stay recognisable by their name
(the segment label) either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from kubeseg.jsonio import read_json

FILENAME = "label_codes.json"
_ABNORMAL_WORDS = {"lesion", "tumor", "tumour", "neoplasm", "mass", "cancer", "metastasis", "nodule", "cyst",
                   "edema", "necrosis", "enhancing"}
_ALIASES = {"tumour": "Tumor", "bladder": "Bladder", "body": "Body"}


@dataclass(frozen=True)
class Code:
    value: str
    scheme: str
    meaning: str

    def to_json(self) -> dict:
        return {"value": self.value, "scheme": self.scheme, "meaning": self.meaning}

    @classmethod
    def from_json(cls, d: Mapping) -> "Code":
        return cls(str(d["value"]), str(d["scheme"]), str(d["meaning"]))


@dataclass(frozen=True)
class LabelCode:
    category: Code
    type: Code

    def to_json(self) -> dict:
        return {"category": self.category.to_json(), "type": self.type.to_json()}


ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically Abnormal Structure")
TISSUE = Code("85756007", "SCT", "Tissue")


def _sct(keyword: str) -> Code | None:
    from pydicom.sr.codedict import codes

    try:
        c = getattr(codes.SCT, keyword)
    except AttributeError:
        return None
    return Code(str(c.value), "SCT", str(c.meaning))


def default_label_code(name: str) -> LabelCode:
    """The coded concept for a label name (see the module's docstring)."""
    words = [w for w in name.replace("-", "_").replace(" ", "_").split("_") if w]
    keyword = "".join(w[:1].upper() + w[1:].lower() for w in words)
    abnormal = any(w.lower() in _ABNORMAL_WORDS for w in words)
    code = _sct(_ALIASES.get(name.lower(), keyword)) if keyword else None
    for w in reversed(words if code is None and len(words) > 1 else []):  # left_kidney → Kidney
        code = _sct(w[:1].upper() + w[1:].lower())
        if code is not None:
            break
    category = ABNORMAL_STRUCTURE if abnormal else ANATOMICAL_STRUCTURE
    return LabelCode(category, code or TISSUE)


def default_label_codes(labels: Mapping[str, int]) -> dict[str, LabelCode]:
    """Defaults for every foreground label of ``dataset.json``'s ``labels``."""
    return {name: default_label_code(name) for name, value in labels.items() if _is_foreground(value)}


def _is_foreground(value) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return any(int(v) != 0 for v in values)


def label_codes_json(labels: Mapping[str, int]) -> dict:
    return {name: c.to_json() for name, c in default_label_codes(labels).items()}


def load_label_codes(bundle: str | Path | None, labels: Mapping[str, int]) -> dict[str, LabelCode]:
    """The bundle's map, completed with defaults for labels it does not name."""
    codes = default_label_codes(labels)
    path = Path(bundle) / FILENAME if bundle is not None else None
    if path is not None and path.is_file():
        for name, d in read_json(path).items():
            if name in codes:
                codes[name] = LabelCode(Code.from_json(d["category"]), Code.from_json(d["type"]))
    return codes
