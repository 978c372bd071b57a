"""Unlabelled site adaptation: re-estimate a network's BatchNorm statistics on images of the site it will meet.

A network trained at one hospital normalises each layer with the means and variances of that hospital's images
(BatchNorm running statistics). Another scanner shifts them. `adapt_batchnorm` replaces them with those of a set of
unlabelled lesion crops from the new site (AdaBN, Li et al. 2018); no weight is trained and no label is read.
`adapt_package` writes the result as a new model package that records what it was adapted on: `alnus predict`, the
service and every other path read it like any package.

The adapted network's probabilities move, so the source package's frozen threshold is not carried over: calls need a
threshold frozen again on labelled validation patients of the new site.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import nn

from alnus._io import atomic_write_text, file_sha256
from alnus.errors import AlnusError
from alnus.models.package import EXPORT_FILES, METADATA_FILE, WEIGHTS_FILE, read_metadata, save_package

if TYPE_CHECKING:
    from alnus.data.dataset import ImageCache
    from alnus.predict import Predictor

# Fewer crops than this give BatchNorm statistics too noisy to normalise with.
MIN_IMAGES = 16
# Keys save_package writes itself, or that describe the source package's weights rather than the adapted ones.
_NOT_CARRIED = ("weights_sha256", "versions", "created", "exports", "format_version", "threshold", "threshold_history")
# Files of the source package that describe it and not the adapted weights (examples' probabilities, fp16 parity).
_LEFT_BEHIND = ("examples.csv", "parity.json")


class AdaptError(AlnusError):
    """The package or the images cannot be used for adaptation."""


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def adapt_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace the running mean and variance of every BatchNorm layer of `model` by their averages over `batches`
    (each `(B, C, H, W)` on the model's device); the affine weights and every other parameter stay. Returns the number
    of images seen. The model is left in eval mode.

    Raises:
        AdaptError: the model has no BatchNorm layer, or fewer than `MIN_IMAGES` images came (the statistics are
            then left as they were).
    """
    layers = batchnorm_layers(model)
    if not layers:
        raise AdaptError(f"{type(model).__name__} has no BatchNorm layer: there are no statistics to adapt.")
    saved = {id(bn): (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone(), bn.momentum)
             for bn in layers}  # fmt: skip
    model.eval()
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over all batches, each batch weighted alike
        bn.train()
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if len(batch) == 0:
                    continue
                model(batch)
                seen += len(batch)
    finally:
        for bn in layers:
            bn.momentum = saved[id(bn)][3]
        model.eval()
    if seen < MIN_IMAGES:
        for bn in layers:
            mean, var, tracked, _ = saved[id(bn)]
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.num_batches_tracked.copy_(tracked)
        raise AdaptError(
            f"{seen} image(s) were read; BatchNorm statistics need at least {MIN_IMAGES} (a few hundred is better). "
            "Give more images of the site."
        )
    return seen


def adapt_predictor(
    predictor: Predictor,
    table: pd.DataFrame,
    root: str | os.PathLike[str],
    *,
    cache: ImageCache | None = None,
    batch_size: int = 32,
) -> int:
    """Adapt every network of a loaded `Predictor` (PyTorch engine, not compiled) in place to the images of a
    manifest-like table (paths relative to `root`); labels, if the table has any, are not read. Each network reads the
    images with its own preprocessing. Returns the number of images."""
    from alnus.data.dataset import UltrasoundDataset

    if predictor.compiled or any(network.engine != "torch" for network in predictor.networks):
        raise AdaptError("adaptation changes the PyTorch weights: load the predictor with engine='torch', uncompiled.")
    unlabelled = table.assign(label="")
    n = 0
    for network in predictor.networks:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="no row has label")
            dataset = UltrasoundDataset(
                unlabelled, root, network.spec, cache=cache, positive_label=predictor.positive_label
            )

        def batches(
            dataset: UltrasoundDataset = dataset, device: torch.device = network.device
        ) -> Iterable[torch.Tensor]:
            for start in range(0, len(dataset), batch_size):
                stop = min(start + batch_size, len(dataset))
                yield torch.stack([dataset[i][0] for i in range(start, stop)]).to(device)

        n = adapt_batchnorm(network.model, batches())
    return n


@dataclass
class Adapted:
    """What `adapt_package` did: the new package, the number of images it was adapted on, and the files left out
    (name, reason)."""

    package: Path
    n_images: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def images_digest(paths: Iterable[str | os.PathLike[str]]) -> str:
    """SHA-256 over the sorted SHA-256 of each file's bytes: which images, whatever their order or names."""
    digests = sorted(file_sha256(Path(p)) for p in paths)
    return hashlib.sha256("\n".join(digests).encode("ascii")).hexdigest()


def adapt_package(
    package: str | os.PathLike[str],
    inputs: pd.DataFrame,
    out: str | os.PathLike[str],
    *,
    site: str = "",
    batch_size: int = 32,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Adapted:
    """Adapt a single-network package's BatchNorm statistics to the images of `inputs` and write it to `out`.

    Args:
        package: a model package folder (not an ensemble: adapt each member, then build the ensemble again).
        inputs: one row per image as `alnus.data.inputs.collect_inputs` returns it (`path`, and `roi` or `mask` where
            the package crops the lesion); a row that cannot be read is skipped and listed in the result.
        out: the new package's folder; it must not exist unless `force`, and never be the source package.
        site: the site's name, recorded in the package.

    Raises:
        AdaptError: an ensemble package, an `out` that exists (without `force`) or is the source, or too few images.
    """
    from alnus.predict import Predictor

    source, target = Path(package), Path(out)
    meta = read_metadata(source)
    if meta.get("kind") == "ensemble":
        raise AdaptError(
            f"{source} is an ensemble package: adapt each member package (`alnus adapt MEMBER ...`), then build the "
            "ensemble from the adapted members again with `alnus ensemble`."
        )
    if target.resolve() == source.resolve() or source.resolve() in target.resolve().parents:
        raise AdaptError(f"--out {target} would write into the source package; name a new folder.")
    if target.exists() and not force:
        raise AdaptError(f"{target} exists; name a new folder, or pass --force to replace it.")
    predictor = Predictor(source, device="cpu", precision="fp32", engine="torch", batch_size=batch_size)
    network = predictor.networks[0]
    records = [{str(k): "" if pd.isna(v) else str(v) for k, v in r.items()} for r in inputs.to_dict("records")]
    skipped: list[tuple[str, str]] = []
    read: list[str] = []

    def batches() -> Iterable[torch.Tensor]:
        pending: list[torch.Tensor] = []
        for i, row in enumerate(records):
            name = row.get("image") or row.get("path", "?")
            if row.get("error"):
                skipped.append((name, row["error"]))
            else:
                try:
                    tensors, _ = predictor.network_inputs(row)
                    pending.append(tensors[0])
                    read.append(row["path"])
                except (AlnusError, ValueError, OSError) as exc:
                    skipped.append((name, str(exc) or type(exc).__name__))
            if len(pending) == batch_size:
                yield torch.stack(pending)
                pending = []
            if progress is not None:
                progress(i + 1, len(records))
        if pending:
            yield torch.stack(pending)

    n = adapt_batchnorm(network.model, batches())
    carried = {k: v for k, v in meta.items() if k not in _NOT_CARRIED}
    carried["adaptation"] = {
        "method": "batchnorm statistics (AdaBN): running means and variances re-estimated, weights unchanged",
        "site": site,
        "n_images": n,
        "n_skipped": len(skipped),
        "images_sha256": images_digest(read),
        "source_weights_sha256": meta["weights_sha256"],
        "source_threshold": meta.get("threshold"),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        written = save_package(work, network.model, carried)
        left = {WEIGHTS_FILE, METADATA_FILE, "README.md", *_LEFT_BEHIND, *EXPORT_FILES.values()}
        for item in source.iterdir():
            if item.is_file() and not item.is_symlink() and item.name not in left:
                shutil.copy2(item, work / item.name)  # the data licence, for one
        atomic_write_text(work / "README.md", _card(source, written["adaptation"]))
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Adapted(target, n, skipped, written)


def _card(source: Path, adaptation: dict[str, Any]) -> str:
    """The source package's model card with a section on the adaptation (the card itself only when it is a regular
    file: `alnus.predict.read_card`)."""
    from alnus.predict import read_card

    card = read_card(source).rstrip()
    threshold = adaptation["source_threshold"]
    was = f" (the source's was {threshold['value']:.4g}, frozen before adaptation)" if threshold else ""
    section = [
        "## Site adaptation",
        "",
        f"These weights are {source.name}'s with their BatchNorm statistics re-estimated on {adaptation['n_images']} "
        f"unlabelled image(s){' of ' + adaptation['site'] if adaptation['site'] else ''} on {adaptation['date'][:10]} "
        f"(`alnus adapt`; images SHA-256 {adaptation['images_sha256'][:12]}...). Every other weight is unchanged and "
        "no label was read. The numbers above were measured before adaptation.",
        "",
        f"No threshold is carried over{was}: the adapted probabilities move, so calls need a threshold frozen again "
        "on labelled validation patients of this site.",
    ]
    return (card + "\n\n" if card else "") + "\n".join(section) + "\n"
