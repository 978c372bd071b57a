"""The CLAIM checklist (Checklist for Artificial Intelligence in Medical Imaging; Mongan, Moy & Kahn, Radiology:
Artificial Intelligence 2020;2(2):e200029): where in the report each item is answered.

Items about the manuscript rather than the analysis (abstract, hypotheses, registration, funding) are left to the
authors and marked so; an item that does not apply to this run (e.g. ensembling, when there is none) says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Status words of the checklist table.
ANSWERED = "answered"
PARTLY = "partly answered"
AUTHORS = "for the authors"
NOT_APPLICABLE = "not applicable"


@dataclass(frozen=True)
class ClaimItem:
    number: int
    section: str
    item: str
    status: str
    where: tuple[str, ...] = ()  # anchors (section ids) in the report
    note: str = ""


_AUTHORS_NOTE = "a statement of the manuscript; the report does not write it"

# (number, section, item, status, anchors, note); anchors are the report's section and block ids.
# fmt: off
_ITEMS: tuple[tuple[int, str, str, str, tuple[str, ...], str], ...] = (
    (1, "Title and abstract", "Identification as a study of AI methodology, specifying the category of technology",
     ANSWERED, ("top", "methods-models"), ""),
    (2, "Title and abstract", "Structured summary of study design, methods, results, and conclusions", AUTHORS, (),
     _AUTHORS_NOTE),
    (3, "Introduction", "Scientific and clinical background, including the intended use and clinical role",
     PARTLY, ("intended-use",), "intended use stated; the background is for the authors"),
    (4, "Introduction", "Study objectives and hypotheses", AUTHORS, (), _AUTHORS_NOTE),
    (5, "Methods: study design", "Prospective or retrospective study", ANSWERED, ("methods-data",), ""),
    (6, "Methods: study design", "Study goal, such as model creation, exploratory study, feasibility study, "
     "non-inferiority trial", ANSWERED, ("intended-use",), ""),
    (7, "Methods: data", "Data sources", ANSWERED, ("methods-data", "flow"), ""),
    (8, "Methods: data", "Eligibility criteria: how, where, and when potentially eligible participants or studies "
     "were identified", PARTLY, ("flow", "model-card"), "sites and exclusions given; recruitment is for the authors"),
    (9, "Methods: data", "Data pre-processing steps", ANSWERED, ("methods-preprocessing",), ""),
    (10, "Methods: data", "Selection of data subsets, if applicable", ANSWERED, ("methods-split", "flow"), ""),
    (11, "Methods: data", "Definitions of data elements, with references to Common Data Elements", PARTLY,
     ("methods-data", "case-characteristics"), "manifest columns named; common data elements are for the authors"),
    (12, "Methods: data", "De-identification methods", AUTHORS, (), "done before the data reach alnus"),
    (13, "Methods: data", "How missing data were handled", ANSWERED, ("flow", "readers"),
     "invalid rows are excluded and counted; missing readings are left out per reader"),
    (14, "Methods: ground truth", "Definition of ground truth reference standard, in sufficient detail to allow "
     "replication", ANSWERED, ("methods-data",), ""),
    (15, "Methods: ground truth", "Rationale for choosing the reference standard (if alternatives exist)", AUTHORS, (),
     _AUTHORS_NOTE),
    (16, "Methods: ground truth", "Source of ground-truth annotations; qualifications and preparation of annotators",
     AUTHORS, (), "comes with the data set"),
    (17, "Methods: ground truth", "Annotation tools", AUTHORS, (), "comes with the data set"),
    (18, "Methods: ground truth", "Measurement of inter- and intrarater variability; methods to mitigate variability "
     "and/or resolve discrepancies", PARTLY, ("readers",), "readers' performance side by side; no agreement statistic"),
    (19, "Methods: data partitions", "Intended sample size and how it was determined", AUTHORS, (),
     "the report gives the sizes used (Patient flow), not how they were planned"),
    (20, "Methods: data partitions", "How data were assigned to partitions; specify proportions", ANSWERED,
     ("methods-split",), ""),
    (21, "Methods: data partitions", "Level at which partitions are disjoint (e.g., image, study, patient, "
     "institution)", ANSWERED, ("methods-split",), ""),
    (22, "Methods: model", "Detailed description of model, including inputs, outputs, all intermediate layers and "
     "connections", ANSWERED, ("methods-models", "model-card"), "standard backbones named; layers by reference"),
    (23, "Methods: model", "Software libraries, frameworks, and packages", ANSWERED, ("methods-software",), ""),
    (24, "Methods: model", "Initialization of model parameters (e.g., randomization, transfer learning)", ANSWERED,
     ("methods-models",), ""),
    (25, "Methods: training", "Details of training approach, including data augmentation, hyperparameters, number of "
     "models trained", ANSWERED, ("methods-models", "methods-augmentation"), ""),
    (26, "Methods: training", "Method of selecting the final model", ANSWERED, ("methods-models", "methods-threshold"),
     ""),
    (27, "Methods: training", "Ensembling techniques, if applicable", NOT_APPLICABLE, ("methods-models",),
     "no ensembling: each model is reported on its own"),
    (28, "Methods: evaluation", "Metrics of model performance", ANSWERED, ("methods-statistics",), ""),
    (29, "Methods: evaluation", "Statistical measures of significance and uncertainty (e.g., confidence intervals)",
     ANSWERED, ("methods-statistics",), ""),
    (30, "Methods: evaluation", "Robustness or sensitivity analysis", PARTLY, ("results", "calibration"),
     "results per image and per patient, and calibration; no perturbation analysis"),
    (31, "Methods: evaluation", "Methods for explainability or interpretability (e.g., saliency maps), and how they "
     "were validated", ANSWERED, ("methods-explain", "heatmaps"), ""),
    (32, "Methods: evaluation", "Validation or testing on external data", ANSWERED, ("results", "methods-split"), ""),
    (33, "Results: data", "Flow of participants or cases, using a diagram to indicate inclusion and exclusion",
     ANSWERED, ("flow",), ""),
    (34, "Results: data", "Demographic and clinical characteristics of cases in each partition", ANSWERED,
     ("case-characteristics",), ""),
    (35, "Results: model performance", "Performance metrics for optimal model(s) on all data partitions", ANSWERED,
     ("results",), ""),
    (36, "Results: model performance", "Estimates of diagnostic accuracy and their precision (such as 95% "
     "confidence intervals)", ANSWERED, ("results", "readers"), ""),
    (37, "Results: model performance", "Failure analysis of incorrectly classified cases", PARTLY, ("heatmaps",),
     "heat maps of false positives and false negatives; no systematic failure analysis"),
    (38, "Discussion", "Study limitations, including potential bias, statistical uncertainty, and generalizability",
     PARTLY, ("model-card",), "known limitations in the model card; the discussion is for the authors"),
    (39, "Discussion", "Implications for practice, including the intended use and/or clinical role", PARTLY,
     ("intended-use", "model-card"), "intended and out-of-scope use stated"),
    (40, "Other information", "Registration number and name of registry", AUTHORS, (), _AUTHORS_NOTE),
    (41, "Other information", "Where the full study protocol can be accessed", PARTLY, ("methods",),
     "the run's config.yaml is the analysis protocol; a study protocol is for the authors"),
    (42, "Other information", "Sources of funding and other support; role of funders", AUTHORS, (), _AUTHORS_NOTE),
)
# fmt: on


def _ensembling_note(ensembles: Mapping[str, str]) -> str:
    return (
        "; ".join(ensembles.values())
        + ". Each member was trained on this run's training patients and selected on its validation patients "
        "(training-data hash checked); the members must have been chosen on validation results alone, which the "
        "report states in each ensemble's model card (Known limitations) but cannot check: how they were chosen is "
        "for the authors to say"
    )


def claim_items(
    *, has_heatmaps: bool, has_readers: bool, has_external: bool, ensembles: Mapping[str, str] | None = None
) -> list[ClaimItem]:
    """The 42 CLAIM items with where this run's report answers each; items whose part is missing say so.

    Args:
        ensembles: each ensemble of the run with one line on its members, combination and TTA views
            (`alnus.report._members.ensemble_summary`); none: no ensembling.
    """
    items = []
    for number, section, text, status, where, note in _ITEMS:
        if number == 27 and ensembles:
            status, note = ANSWERED, _ensembling_note(ensembles)
            where = ("methods-models", "methods-preprocessing", *(f"model-card-{name}" for name in ensembles))
        elif number in (31, 37) and not has_heatmaps:
            status, note = AUTHORS, "no heat maps in this run: run `alnus explain RUN`, then `alnus report RUN`"
            where = ("methods-explain",)
        elif number == 18 and not has_readers:
            status, where, note = NOT_APPLICABLE, (), "no reader readings in this study"
        elif number == 32 and not has_external:
            status, note = NOT_APPLICABLE, "no external site was held out in this study"
        items.append(ClaimItem(number, section, text, status, where, note))
    return items
