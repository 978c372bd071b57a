"""Patient-level splits (train / val / internal_test / external_test) and leakage checks.

Design after Zhou et al., Radiology 2020;294:19-28: the development hospital's patients are split into
train (with a validation part carved from it) and an internal test; a second hospital is the external test.
For cross-validation (`alnus.cv`) the validation part is one of K patient-level folds instead.
Near-duplicate images (the same frame saved twice, possibly re-encoded or rescaled) are found with a
perceptual hash (DCT-based pHash; Zauner 2010, Krawetz 2011) so that they never straddle two splits.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from alnus._levels import case_names, case_parts
from alnus.data.images import ImageReadError, load_image, parse_frame
from alnus.errors import AlnusError
from alnus.operating_point import FEW_CASES

SPLITS = ("train", "val", "internal_test", "external_test")

# Hamming distance (of 256 bits) at or below which two pHash-16 hashes are the same image; chosen from
# `bench/duplicate_threshold.py` on the real data (docs/results.md, "Near-duplicate threshold").
DEFAULT_MAX_DISTANCE = 32

PAIR_COLUMNS = ["row_a", "row_b", "image_a", "image_b", "patient_a", "patient_b", "distance"]
_ROW_OFFSET = 2  # spreadsheet rows: the header is row 1, the first data row (index 0) is row 2


class LeakageError(AlnusError):
    """The split lets a patient or a near-duplicate image into two splits; `.problems` lists each case."""

    def __init__(self, problems: Sequence[str], hint: str = "") -> None:
        self.problems = list(problems)
        lines = [f"{len(self.problems)} leakage problem(s) in the split:"]
        lines += [f"  - {p}" for p in self.problems]
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


@dataclass
class SplitResult:
    """What `split_manifest` returns: the split table, its counts, the near-duplicate pairs and notes."""

    splits: pd.DataFrame
    report: pd.DataFrame
    duplicates: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def _spreadsheet_rows(index: pd.Index) -> list[int]:
    return [int(i) + _ROW_OFFSET for i in index]


def _check_index(df: pd.DataFrame) -> None:
    # Rows are named by index label (+2 = spreadsheet row), so labels must be unique integers, as
    # read_manifest (or a row filter of it) gives.
    if not (pd.api.types.is_integer_dtype(df.index) and df.index.is_unique):
        raise ValueError("the manifest table needs a unique integer index (as read); call reset_index(drop=True)")


def _require(df: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise AlnusError(f"manifest lacks column(s) {', '.join(missing)}; add them (see docs/architecture.md).")


def _sites(df: pd.DataFrame) -> pd.Series:
    if "site" in df.columns:
        return df["site"].astype(str)
    return pd.Series("", index=df.index, dtype=object)


def _patient_keys(df: pd.DataFrame) -> pd.Series:
    """One key per row naming its patient; patient ids are only unique within a site."""
    if "site" not in df.columns:
        return case_names(df, ["patient_id"])
    # Joined by "/" with any "/" inside an id escaped (alnus._levels.case_names): site "a/b" with patient "1" and
    # site "a" with patient "b/1" stay two patients.
    return case_names(df, ["site", "patient_id"])


def _describe_group(unit: str, keys: pd.Series) -> str:
    """A split unit as the manifest's values: a near-duplicate group is named after its first patient's key
    (`group_near_duplicates`), so one that is a patient key reads "the group of patient P (site S)"."""
    return f"the group of {_describe_patient(unit)}" if unit in set(keys) else f"group {unit}"


def _describe_patient(key: str) -> str:
    """A patient key (`_patient_keys`, "site/patient_id" escaped) as the manifest's values: "patient P (site S)"."""
    *site, patient = case_parts(key)
    return f"patient {patient}" + (f" (site {site[0]})" if site and site[0] else "")


def _rows_text(rows: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(r) for r in rows[:limit])
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more}"


def _unit_labels(df: pd.DataFrame, keys: pd.Series, units: pd.Series, notes: list[str]) -> pd.Series:
    """The stratification label of each unit (patient or group), sorted by unit."""
    label = df["label"].astype(str)
    per_patient = label.groupby(keys).nunique()
    mixed = per_patient[per_patient > 1].index
    if len(mixed):
        details = [
            f"{_describe_patient(k)} has labels {sorted(label[keys == k].unique())} "
            f"({_rows_text(_spreadsheet_rows(df.index[keys == k]))})"
            for k in sorted(mixed)
        ]
        raise AlnusError(
            "a patient's images disagree on the label; fix the manifest so each patient has one label:\n  - "
            + "\n  - ".join(details)
        )
    patients = pd.DataFrame({"unit": units.groupby(keys).first(), "label": label.groupby(keys).first()})
    counts = patients.groupby(["unit", "label"]).size().rename("n").reset_index()
    # majority label per unit; a tie goes to the alphabetically first label, so the choice is reproducible
    counts = counts.sort_values(["unit", "n", "label"], ascending=[True, False, True])
    chosen = counts.groupby("unit")["label"].first()
    for unit, part in counts.groupby("unit"):
        if len(part) > 1:
            tally = dict(zip(part["label"], part["n"].astype(int), strict=True))
            notes.append(
                f"{_describe_group(unit, keys)} merges patients with labels {tally}; "
                f"stratified as {chosen[unit]!r} (the majority, ties broken alphabetically)"
            )
    return chosen.sort_index()


def _carve(units: pd.Series, frac: float, seed: int, what: str, notes: list[str]) -> tuple[list[object], list[object]]:
    """Split unit ids (`units`: index = id, value = label) into (kept, carved), stratified where possible."""
    # sklearn (and scipy.stats under it) is imported here, not by `alnus predict`, which needs only `phash`.
    from sklearn.model_selection import train_test_split

    ids = list(units.index)
    if frac == 0 or not ids:
        return ids, []
    try:
        kept, carved = train_test_split(ids, test_size=frac, random_state=seed, stratify=units.to_numpy())
    except ValueError as exc:
        notes.append(f"{what}: too few patients per label to stratify ({exc}); split without stratification")
        try:
            kept, carved = train_test_split(ids, test_size=frac, random_state=seed)
        except ValueError as exc2:
            raise AlnusError(
                f"{what}: cannot carve {frac:.0%} of {len(ids)} patient unit(s) ({exc2}); "
                "add patients or lower the fraction."
            ) from exc2
    return list(kept), list(carved)


def _fold(units: pd.Series, folds: int, fold: int, seed: int, notes: list[str]) -> tuple[list[object], list[object]]:
    """Split unit ids (`units`: index = id, value = label) into (train, val): val is fold `fold` of `folds`.

    sklearn's seeded `StratifiedGroupKFold` over the sorted units, one group per unit, stratified by label: the folds
    of one seed partition the units, so each patient is validated in exactly one fold.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    units = units.sort_index()
    ids = units.index.to_numpy(dtype=object)
    if len(ids) < folds:
        raise AlnusError(
            f"data.cv_folds: {folds} folds need at least {folds} development patients outside internal_test, "
            f"found {len(ids)}; lower data.cv_folds (alnus cv --folds) or add patients."
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kfold = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        parts = list(kfold.split(ids, units.to_numpy(), groups=ids))
    notes += [f"cross-validation folds: {w.message}" for w in caught]
    labels = units.to_numpy()
    # Every fold's val must hold both labels (its AUC selects the model): refuse before the first fold trains.
    for k, (_, part) in enumerate(parts):
        if len(set(labels[part])) < len(set(labels)):
            counts = pd.Series(labels).value_counts().to_dict()
            raise AlnusError(
                f"data.cv_folds: with {folds} folds, fold {k}'s val lacks a label (development patients outside "
                f"internal_test per label: {counts}); use fewer folds (--folds) or add patients."
            )
    train, val = parts[fold]
    notes.append(
        f"val is fold {fold} of {folds} (patient-level cross-validation of the development patients outside "
        f"internal_test, stratified by label, seed {seed}); data.val_frac is not used"
    )
    return list(ids[train]), list(ids[val])


def _check_cv(cv_folds: int | None, cv_fold: int, user_split: bool) -> None:
    if cv_folds is None:
        if cv_fold != 0:
            raise AlnusError(f"data.cv_fold is {cv_fold} but data.cv_folds is not set; set both, or neither.")
        return
    if isinstance(cv_folds, bool) or not isinstance(cv_folds, int) or cv_folds < 2:
        raise AlnusError(f"data.cv_folds must be a whole number of at least 2, got {cv_folds!r}.")
    if isinstance(cv_fold, bool) or not isinstance(cv_fold, int) or not 0 <= cv_fold < cv_folds:
        raise AlnusError(f"data.cv_fold must be in 0..{cv_folds - 1} (data.cv_folds is {cv_folds}), got {cv_fold!r}.")
    if user_split:
        raise AlnusError(
            "data.cv_folds: the manifest has its own split column, so alnus does not split and cannot make folds; "
            "clear the split column to cross-validate."
        )


def _check_user_split(df: pd.DataFrame, external_sites: Sequence[str]) -> None:
    split = df["split"].astype(str)
    bad = ~split.isin(SPLITS)
    problems = [
        f"row {r}: split {v!r} is not one of {', '.join(SPLITS)}"
        for r, v in zip(_spreadsheet_rows(df.index[bad]), split[bad], strict=True)
    ]
    if external_sites:
        ext = _sites(df).isin(list(external_sites)) & split.isin(["train", "val"])
        problems += [
            f"row {r}: site {s!r} is external but the row's split is {v!r}"
            for r, s, v in zip(_spreadsheet_rows(df.index[ext]), _sites(df)[ext], split[ext], strict=True)
        ]
    if problems:
        raise AlnusError("the manifest's split column is invalid; fix these rows:\n  - " + "\n  - ".join(problems))


def make_splits(
    df: pd.DataFrame,
    *,
    external_sites: Sequence[str] = (),
    internal_test_frac: float = 0.1,
    val_frac: float = 0.1,
    seed: int = 0,
    group_col: str | None = None,
    cv_folds: int | None = None,
    cv_fold: int = 0,
) -> pd.DataFrame:
    """Assign each patient (or each `group_col` group of patients) to one split, stratified by label.

    Development sites (all but `external_sites`) give `internal_test_frac` of their patients to
    internal_test and `val_frac` of the remaining patients to val; external sites go to external_test.
    Patients are sorted before sklearn's seeded `train_test_split`, so the result does not depend on the
    row order. A manifest whose `split` column is filled in every row keeps it (values are checked).
    With `cv_folds` K, internal_test is carved as without it (the same patients) and val is fold `cv_fold` of K
    of the remaining development patients (`_fold`); `val_frac` is not used.

    Returns:
        A copy of `df` with a `split` column; `.attrs["notes"]` lists what was decided on the way
        (unstratified fallbacks, merged groups' labels, a kept user split).
    """
    _require(df, ["patient_id", "label"] + ([group_col] if group_col else []))
    _check_index(df)
    for name, frac in (("internal_test_frac", internal_test_frac), ("val_frac", val_frac)):
        if not 0 <= frac < 1:
            raise AlnusError(f"{name} must be at least 0 and below 1, got {frac}.")
    filled_split = "split" in df.columns and (df["split"].fillna("").astype(str).str.strip() != "").all()
    _check_cv(cv_folds, cv_fold, user_split=bool(filled_split and len(df)))
    sites = _sites(df)
    known = sorted(set(sites))
    unknown = [s for s in external_sites if s not in set(sites)]
    if unknown:
        raise AlnusError(
            f"external site(s) {', '.join(map(repr, unknown))} not in the manifest's site column; "
            f"known sites: {', '.join(map(repr, known)) if known != [''] else '(no site column)'}."
        )
    notes: list[str] = []
    out = df.copy()
    if "split" in df.columns:
        filled = df["split"].fillna("").astype(str).str.strip() != ""
        if filled.all() and len(df):
            _check_user_split(df, external_sites)
            out.attrs["notes"] = ["kept the manifest's own split column"]
            return out
        if filled.any():
            rows = _spreadsheet_rows(df.index[~filled])
            raise AlnusError(
                f"the manifest's split column is filled in some rows but empty in {_rows_text(rows)}; "
                "fill it in every row (your own split) or clear it (alnus splits)."
            )

    for column in ["patient_id"] + ([group_col] if group_col else []):
        empty = df[column].fillna("").astype(str).str.strip() == ""
        if empty.any():
            raise AlnusError(f"{column} is empty in {_rows_text(_spreadsheet_rows(df.index[empty]))}; fill it in.")
    keys = _patient_keys(df)
    units = df[group_col].astype(str) if group_col else keys
    split_groups = units.groupby(keys).nunique()
    if (split_groups > 1).any():
        k = split_groups[split_groups > 1].index[0]
        raise AlnusError(
            f"{_describe_patient(k)} has rows in different '{group_col}' groups; a group must hold "
            "all of a patient's images."
        )
    unit_labels = _unit_labels(df, keys, units, notes)

    external = sites.isin(list(external_sites))
    unit_external = external.groupby(units).agg(["any", "all"])
    mixed = unit_external[unit_external["any"] & ~unit_external["all"]].index
    if len(mixed):
        raise AlnusError(
            f"{'; '.join(_describe_group(u, keys) for u in sorted(mixed))}: near-duplicate images from both a "
            "development and an external site; remove the duplicate image from one site in the manifest."
        )
    external_units = unit_external.index[unit_external["all"]]
    dev = unit_labels.drop(external_units)
    rest, internal = _carve(dev, internal_test_frac, seed, "internal_test", notes)
    if cv_folds is None:
        train, val = _carve(dev.loc[rest], val_frac, seed, "val", notes)
    else:
        train, val = _fold(dev.loc[rest], cv_folds, cv_fold, seed, notes)
    assignment = {u: "external_test" for u in external_units}
    assignment.update({u: "internal_test" for u in internal})
    assignment.update({u: "val" for u in val})
    assignment.update({u: "train" for u in train})
    out["split"] = units.map(assignment)
    out.attrs["notes"] = notes
    return out


def phash(pixels: np.ndarray, hash_size: int = 16) -> str:
    """The perceptual hash (imagehash.phash, hex string) of a decoded grey-scale image; `image_hashes` says why."""
    return str(imagehash.phash(Image.fromarray(pixels), hash_size=hash_size))


def image_hashes(
    df: pd.DataFrame, root: str | Path, *, hash_size: int = 16, max_pixels: int | None = None
) -> pd.Series:
    """Perceptual hash (imagehash.phash, hex string) of each row's decoded grey-scale image.

    pHash (Zauner 2010) thresholds the low-frequency 2-D DCT of a (4*hash_size)^2 thumbnail: JPEG
    re-encoding and rescaling change mostly high frequencies, so a re-saved copy keeps its hash while
    distinct scans do not. `bench/duplicate_threshold.py` measures the distances of re-saved copies and of
    distinct images on the real data (docs/results.md, "Near-duplicate threshold"); pHash separated them
    better than dHash, and `DEFAULT_MAX_DISTANCE` lies above every copy and well under the closest distinct
    pair. The whole decoded image is hashed (`us_region=False`), i.e. what the file holds, so the measured
    threshold does not hinge on a cropping heuristic. `max_pixels` is `alnus.data.images.load_image`'s
    decoded-size limit.
    """
    _require(df, ["image"])
    root = Path(root)
    frames = df["frame"].fillna("").astype(str).str.strip() if "frame" in df.columns else pd.Series("", index=df.index)
    out = {}
    for idx, rel, frame in zip(df.index, df["image"].astype(str), frames, strict=True):
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        try:
            index = parse_frame(frame)
        except ValueError as exc:
            raise AlnusError(f"row {int(idx) + _ROW_OFFSET}: {exc}.") from None
        try:
            pixels = load_image(path, frame=index, us_region=False, max_pixels=max_pixels)
        except ImageReadError as exc:
            raise ImageReadError(f"row {int(idx) + _ROW_OFFSET}: {exc}") from exc
        out[idx] = phash(pixels, hash_size)
    return pd.Series(out, index=df.index, dtype=object, name="hash")


def _pack(hashes: pd.Series) -> np.ndarray:
    """Hex hashes -> (n, words) unsigned array of their bits, for XOR + popcount."""
    lengths = hashes.astype(str).str.len().unique()
    if len(lengths) > 1:
        raise ValueError(f"hashes differ in length ({sorted(lengths)} hex digits); hash all images with one size")
    width = int(lengths[0]) if len(lengths) else 0
    width += width % 2
    raw = b"".join(bytes.fromhex(str(h).zfill(width)) for h in hashes)
    packed = np.frombuffer(raw, dtype=np.uint8).reshape(len(hashes), width // 2)
    if packed.shape[1] % 8 == 0:  # whole 64-bit words: 8x fewer XORs and popcounts
        return packed.view(np.uint64)
    return packed


def _pairs_within(packed: np.ndarray, max_distance: int, block: int = 256) -> tuple[np.ndarray, ...]:
    """Index pairs (i < j) and their Hamming distance <= max_distance, computed block by block."""
    n = len(packed)
    found_i, found_j, found_d = [], [], []
    for start in range(0, n, block):
        stop = min(start + block, n)
        dist = np.bitwise_count(packed[start:stop, None, :] ^ packed[None, start:, :]).sum(axis=-1, dtype=np.int64)
        i, j = np.nonzero(dist <= max_distance)
        i_abs, j_abs = i + start, j + start
        keep = j_abs > i_abs
        found_i.append(i_abs[keep])
        found_j.append(j_abs[keep])
        found_d.append(dist[i[keep], j[keep]])
    if not found_i:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)


def find_near_duplicates(df: pd.DataFrame, hashes: pd.Series, *, max_distance: int) -> pd.DataFrame:
    """All image pairs whose hashes lie within `max_distance` (Hamming), vectorised with numpy.

    Returns:
        Columns row_a, row_b (spreadsheet rows: index label + 2), image_a, image_b, patient_a,
        patient_b, distance; one row per pair, row_a < row_b.
    """
    _require(df, ["image", "patient_id"])
    _check_index(df)
    hashes = hashes.reindex(df.index)
    if hashes.isna().any():
        raise ValueError("hashes must hold one hash per manifest row (index aligned with the table)")
    i, j, d = _pairs_within(_pack(hashes), max_distance)
    rows = np.asarray(df.index, dtype=np.int64) + _ROW_OFFSET
    images, patients = df["image"].astype(str).to_numpy(), df["patient_id"].astype(str).to_numpy()
    pairs = pd.DataFrame(
        {
            "row_a": rows[i],
            "row_b": rows[j],
            "image_a": images[i],
            "image_b": images[j],
            "patient_a": patients[i],
            "patient_b": patients[j],
            "distance": d,
        },
        columns=PAIR_COLUMNS,
    )
    swap = pairs["row_a"] > pairs["row_b"]  # an unsorted index can list the later row first
    if swap.any():
        for a, b in (("row_a", "row_b"), ("image_a", "image_b"), ("patient_a", "patient_b")):
            pairs.loc[swap, [a, b]] = pairs.loc[swap, [b, a]].to_numpy()
    return pairs.sort_values(["row_a", "row_b"], ignore_index=True)


def _pair_positions(df: pd.DataFrame, pairs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Map the pairs' spreadsheet rows back to positions in `df`, checking they name the same images."""
    pos = pd.Series(np.arange(len(df)), index=df.index)
    labels_a, labels_b = pairs["row_a"].astype(int) - _ROW_OFFSET, pairs["row_b"].astype(int) - _ROW_OFFSET
    missing = ~labels_a.isin(df.index) | ~labels_b.isin(df.index)
    a, b = pos.reindex(labels_a).to_numpy(), pos.reindex(labels_b).to_numpy()
    images = df["image"].astype(str).to_numpy()
    if missing.any() or (
        len(pairs)
        and not (
            (images[a] == pairs["image_a"].astype(str).to_numpy()).all()
            and (images[b] == pairs["image_b"].astype(str).to_numpy()).all()
        )
    ):
        raise ValueError("the near-duplicate pairs were found on another table; rerun find_near_duplicates on it")
    return a.astype(np.int64), b.astype(np.int64)


def group_near_duplicates(df: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Add a `group` column joining patients linked by near-duplicate pairs (connected components).

    A group is named after its first member (sorted `patient_id`, prefixed by `site/` when the manifest
    has a site column); a patient with no duplicate is a group of its own, and a group never splits one.
    """
    _require(df, ["image", "patient_id"])
    _check_index(df)
    keys = _patient_keys(df)
    patients = np.array(sorted(keys.unique()), dtype=object)
    code = pd.Series(np.arange(len(patients)), index=patients)
    a, b = _pair_positions(df, pairs)
    ca, cb = code[keys.to_numpy()[a]].to_numpy(), code[keys.to_numpy()[b]].to_numpy()
    graph = coo_matrix((np.ones(len(ca)), (ca, cb)), shape=(len(patients), len(patients)))
    _, component = connected_components(graph, directed=False)
    # patients are sorted, so the first patient seen in each component is its smallest member
    first = pd.Series(patients).groupby(component).first()
    out = df.copy()
    out["group"] = keys.map(pd.Series(first.loc[component].to_numpy(), index=patients))
    return out


def check_leakage(splits: pd.DataFrame, pairs: pd.DataFrame | None = None) -> list[str]:
    """Problems that let information cross splits: a patient in two splits, a near-duplicate pair across two.

    A near-duplicate pair within one split is fine (the same frame twice only weights it).
    """
    _require(splits, ["patient_id", "split"])
    _check_index(splits)
    problems = []
    keys = _patient_keys(splits)
    split = splits["split"].astype(str)
    per_patient = split.groupby(keys).nunique()
    for key in sorted(per_patient[per_patient > 1].index):
        mine = split[keys == key]
        where = "; ".join(
            f"{s} ({_rows_text(_spreadsheet_rows(mine.index[mine == s]))})" for s in sorted(mine.unique())
        )
        problems.append(f"{_describe_patient(key)} is in {mine.nunique()} splits: {where}")
    if pairs is not None and len(pairs):
        a, b = _pair_positions(splits, pairs)
        sa, sb = split.to_numpy()[a], split.to_numpy()[b]
        for k in np.nonzero(sa != sb)[0]:
            p = pairs.iloc[k]
            ka, kb = keys.to_numpy()[a[k]], keys.to_numpy()[b[k]]
            problems.append(
                f"near-duplicate images (distance {p['distance']}) in different splits: "
                f"{p['image_a']} (row {p['row_a']}, {_describe_patient(ka)}, {sa[k]}) and "
                f"{p['image_b']} (row {p['row_b']}, {_describe_patient(kb)}, {sb[k]})"
            )
    return problems


def _label_tally(part: pd.DataFrame) -> str:
    keys = _patient_keys(part)
    counts = keys.groupby(part["label"].astype(str)).nunique()
    return ", ".join(f"{label!r} ({n} patient{'' if n == 1 else 's'})" for label, n in counts.items()) or "none"


def check_classes(splits: pd.DataFrame) -> list[str]:
    """Refuse a training split without both classes; return a note for a validation split without both, and for a
    validation or internal test split with fewer than `FEW_CASES` patients of a class.

    Raises:
        AlnusError: `train` holds fewer than two labels (it names the labels and patients it does hold).
    """
    _require(splits, ["patient_id", "label", "split"])
    train = splits[splits["split"].astype(str) == "train"]
    if train["label"].astype(str).nunique() < 2:
        raise AlnusError(
            f"the training split holds {train['label'].nunique()} label(s) ({_label_tally(train)}); a model "
            "needs patients of both classes to learn from. Check the manifest's labels and split column, and "
            "which sites are held out as external (their patients are never trained on)."
        )
    val = splits[splits["split"].astype(str) == "val"]
    if len(val) and val["label"].astype(str).nunique() < 2:
        return [
            f"the validation split holds one label only ({_label_tally(val)}): its AUC and the threshold frozen "
            "on it are undefined; add patients or raise val_frac"
        ]
    notes = []
    for split, what in (("val", "a threshold frozen on so few moves a lot with the next patients, and its AUC "
                                "chooses the epoch on them; raise data.val_frac or add patients"),
                        ("internal_test", "its intervals will be wide; raise data.internal_test_frac or add "
                                          "patients")):  # fmt: skip
        part = splits[splits["split"].astype(str) == split]
        if part.empty or part["label"].astype(str).nunique() < 2:
            continue
        smaller = int(_patient_keys(part).groupby(part["label"].astype(str)).nunique().min())
        if smaller < FEW_CASES:
            notes.append(f"the {split} split's smaller class has only {smaller} patient{'' if smaller == 1 else 's'} "
                         f"({_label_tally(part)}): {what}")  # fmt: skip
    return notes


def split_report(splits: pd.DataFrame) -> pd.DataFrame:
    """Counts per split and site: patients and images, overall and per label; the last row is the total."""
    _require(splits, ["patient_id", "label", "split"])
    table = pd.DataFrame(
        {
            "split": splits["split"].astype(str),
            "site": _sites(splits),
            "patient": _patient_keys(splits),
            "label": splits["label"].astype(str),
        }
    )
    labels = sorted(table["label"].unique())
    order = {s: i for i, s in enumerate(SPLITS)}

    def counts(part: pd.DataFrame) -> dict[str, int]:
        row = {"patients": part["patient"].nunique(), "images": len(part)}
        for lab in labels:
            mine = part[part["label"] == lab]
            row[f"patients_{lab}"] = mine["patient"].nunique()
            row[f"images_{lab}"] = len(mine)
        return row

    rows = [{"split": s, "site": site, **counts(part)} for (s, site), part in table.groupby(["split", "site"])]
    rows.sort(key=lambda r: (order.get(r["split"], len(order)), r["site"]))
    rows.append({"split": "total", "site": "all", **counts(table)})
    return pd.DataFrame(rows)


def split_manifest(
    df: pd.DataFrame,
    root: str | Path,
    *,
    external_sites: Sequence[str] = (),
    internal_test_frac: float = 0.1,
    val_frac: float = 0.1,
    seed: int = 0,
    check_duplicates: bool = True,
    group_duplicates: bool = False,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    max_pixels: int | None = None,
    cv_folds: int | None = None,
    cv_fold: int = 0,
) -> SplitResult:
    """Hash images, find near-duplicates, (group them), split by patient and check for leakage and classes.

    Raises:
        LeakageError: a patient or a near-duplicate pair straddles two splits.
        AlnusError: the training split holds fewer than two labels (a model cannot learn one class).
    """
    notes = []
    if check_duplicates:
        hashes = image_hashes(df, root, max_pixels=max_pixels)
        pairs = find_near_duplicates(df, hashes, max_distance=max_distance)
        notes.append(f"{len(pairs)} near-duplicate image pair(s) (pHash 16x16, Hamming distance <= {max_distance})")
    else:
        pairs = pd.DataFrame(columns=PAIR_COLUMNS)
        notes.append("near-duplicate check skipped")
    if group_duplicates:
        df = group_near_duplicates(df, pairs)
    splits = make_splits(
        df,
        external_sites=external_sites,
        internal_test_frac=internal_test_frac,
        val_frac=val_frac,
        seed=seed,
        group_col="group" if group_duplicates else None,
        cv_folds=cv_folds,
        cv_fold=cv_fold,
    )
    notes += splits.attrs.get("notes", [])
    notes += check_classes(splits)
    problems = check_leakage(splits, pairs)
    if problems:
        raise LeakageError(
            problems,
            hint="Pass --group-duplicates to keep near-duplicate images' patients in one split, "
            "or fix the manifest (remove the duplicate images, or correct the split column).",
        )
    return SplitResult(splits=splits, report=split_report(splits), duplicates=pairs, notes=notes)
