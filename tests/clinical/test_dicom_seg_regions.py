"""DICOM-SEG of a region model: one segment per region (overlapping masks), read back per segment and,
with regions_class_order, as the label map; highdicom reads the same masks by source instance."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from kubeseg.clinical.dicom_io import read_dicom_input
from kubeseg.clinical.dicom_seg import read_segment_masks, read_segmentation, write_segmentation
from kubeseg.clinical.label_codes import default_label_codes
from tests.clinical.helpers import study

REGIONS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3], "ignore": 4}
ORDER = [1, 2, 3]


@pytest.mark.parametrize("multiframe", [False, True])
def test_region_segments_overlap_and_map_back(tmp_path, multiframe):
    import highdicom as hd

    _, label, _ = study(tmp_path / "ct", multiframe=multiframe)
    src = read_dicom_input(tmp_path / "ct", {0: "CT"})
    lab = label.astype(np.int64)
    lab[2:4, 3:6, 3:6] = 2
    lab[3, 4, 4] = 3
    path = write_segmentation(lab, src.reference, REGIONS, default_label_codes(REGIONS), tmp_path / "seg.dcm")
    seg = pydicom.dcmread(path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["whole tumor", "tumor core", "enhancing tumor"]
    assert seg.SegmentSequence[2].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"  # abnormal
    masks = read_segment_masks(path, src.reference)
    for name in ("whole tumor", "tumor core", "enhancing tumor"):
        np.testing.assert_array_equal(masks[name], np.isin(lab, REGIONS[name]), err_msg=name)
    assert masks["enhancing tumor"].sum() == 1 and (masks["tumor core"] & masks["whole tumor"]).sum() > 1
    np.testing.assert_array_equal(read_segmentation(path, src.reference, REGIONS, ORDER), lab)
    with pytest.raises(ValueError, match="regions_class_order"):
        read_segmentation(path, src.reference, REGIONS)
    if not multiframe:  # highdicom, by source instance, one mask per segment
        uids = [ds.SOPInstanceUID for ds in src.reference.source_datasets]
        by_segment = hd.seg.segread(path).get_pixels_by_source_instance(source_sop_instance_uids=uids)
        np.testing.assert_array_equal(by_segment[..., 1].astype(bool), np.isin(lab, [2, 3]))
