"""A model's results as DICOM: a SEG for a segmentation, an SR for a classification.

Both are made with highdicom, reference the series they were computed from (its study,
series and SOP instances), and name the algorithm: the model's name and version, the
run that trained it, the run's config hash and the medfed version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from federation.modelpack import ModelCard

__all__ = [
    "CLASS_PROBABILITY_SCHEME",
    "LESION",
    "Segment",
    "classification_report",
    "read_probabilities",
    "segmentation",
]

# Coding scheme of the per-class probability measurements (local to medfed).
CLASS_PROBABILITY_SCHEME = "99MEDFED"
SERIES_NUMBER = 9100


@dataclass(frozen=True)
class Segment:
    """What a segmentation task's masks show, as DICOM SEG describes a segment.

    Codes are (value, scheme, meaning) triples, e.g. SNOMED CT's.
    """

    label: str
    category: tuple[str, str, str]
    type: tuple[str, str, str]


LESION = Segment(
    "lesion",
    category=("49755003", "SCT", "Morphologically Abnormal Structure"),
    type=("52988006", "SCT", "Lesion"),
)


def _version(card: ModelCard) -> str:
    return card.version or f"run {card.run}"


def _provenance(card: ModelCard) -> dict[str, str]:
    """What identifies the model beyond its name and version."""
    return {
        "run": card.run,
        "round": str(card.round),
        "config_sha256": card.config_sha256,
        "medfed": card.medfed,
    }


def segmentation(
    mask: np.ndarray, sources: Sequence[Dataset], card: ModelCard, segment: Segment
) -> Dataset:
    """A binary DICOM SEG of `mask` (slices, rows, cols) on the source images' frames.

    Args:
        mask: One frame per source image, in the order of `sources` (single-frame
            images), or per frame of the one multi-frame source.
        sources: The series' images (headers are enough).
        card: The model that made the mask.
        segment: What the mask shows.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=segment.label,
        segmented_property_category=Code(*segment.category),
        segmented_property_type=Code(*segment.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=card.name,
            family=codes.cid7162.ArtificialIntelligence,
            version=_version(card),
            source="medfed",
            parameters=_provenance(card),
        ),
    )
    return hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=mask.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medfed",
        manufacturer_model_name=card.name,
        software_versions=f"medfed {card.medfed}",
        device_serial_number=card.version or card.run,
        series_description=f"{segment.label} by {card.title}"[:64],
        content_description=f"{card.title}, run {card.run}, config {card.config_sha256[:12]}"[:64],
    )


def classification_report(
    probabilities: dict[str, float], sources: Sequence[Dataset], card: ModelCard
) -> Dataset:
    """A Comprehensive 3D SR with each class's probability for the source series."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.sr.AlgorithmIdentification(
        name=card.name,
        version=_version(card),
        parameters=[f"{k}={v}" for k, v in _provenance(card).items()],
    )
    measurements = [
        hd.sr.Measurement(
            name=hd.sr.CodedConcept(
                value=f"P{index}", scheme_designator=CLASS_PROBABILITY_SCHEME, meaning=name
            ),
            value=float(probability),
            unit=codes.UCUM.NoUnits,
            algorithm_id=algorithm,
        )
        for index, (name, probability) in enumerate(probabilities.items())
    ]
    first = sources[0]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"series {first.SeriesInstanceUID}"
        ),
        measurements=measurements,
        algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(first)],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=hd.UID(), name=card.name, model_name=_version(card)
                ),
            )
        ),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[group],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=list(sources),
        content=report,
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medfed",
        series_description=f"classification by {card.title}"[:64],
    )


def read_probabilities(sr: Dataset) -> dict[str, float]:
    """Class probabilities of an SR written by `classification_report`, by class name."""
    found: dict[str, float] = {}

    def walk(items: Sequence[Dataset]) -> None:
        for item in items:
            if item.get("ValueType") == "NUM":
                concept = item.ConceptNameCodeSequence[0]
                if concept.CodingSchemeDesignator == CLASS_PROBABILITY_SCHEME:
                    found[str(concept.CodeMeaning)] = float(
                        item.MeasuredValueSequence[0].NumericValue
                    )
            walk(item.get("ContentSequence") or [])

    walk(sr.get("ContentSequence") or [])
    return found
