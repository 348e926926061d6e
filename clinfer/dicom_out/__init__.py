"""DICOM outputs of model results: Structured Reports and heatmap Secondary Captures."""

from clinfer.dicom_out.capture import heatmap_to_source, write_heatmap_capture
from clinfer.dicom_out.result import ModelResult
from clinfer.dicom_out.sr import write_structured_report

__all__ = [
    "ModelResult",
    "heatmap_to_source",
    "write_heatmap_capture",
    "write_structured_report",
]
