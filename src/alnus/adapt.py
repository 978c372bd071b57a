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

import contextlib
import datetime as dt
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

import alnus
from alnus._io import atomic_write_text, file_sha256
from alnus.data.manifest import labelled_table
from alnus.errors import AlnusError
from alnus.models.package import (
    EXPORT_FILES,
    MEMBERS_DIR,
    METADATA_FILE,
    SITE_NAME,
    WEIGHTS_FILE,
    ensemble_digest,
    format_version_of,
    is_ensemble,
    read_metadata,
    save_package,
)
from alnus.operating_point import describe, rule_name, same_rule

if TYPE_CHECKING:
    from alnus.data.dataset import ImageCache
    from alnus.predict import Predictor

# Fewer crops than this give BatchNorm statistics too noisy to normalise with.
MIN_IMAGES = 16
# adapt_batchnorm estimates every layer in one pass when the activations of all images fit in this share of the
# memory available (this many bytes where the system does not say how much is available).
ONE_PASS_SHARE, ONE_PASS_FALLBACK = 0.5, 4 * 2**30
# The heading of the adapted card's quote of the source's card.
BEFORE_ADAPTATION = "## Before adaptation: the source model's card"
# The model card's section on the site's threshold, rewritten by `alnus threshold`.
SITE_THRESHOLD_START, SITE_THRESHOLD_END = "<!-- site-threshold:start -->", "<!-- site-threshold:end -->"
# Keys save_package writes itself, or that describe the source package's weights rather than the adapted ones.
# The reader rule, like the threshold, was set on the source's probabilities: it is not carried over either.
_NOT_CARRIED = ("weights_sha256", "versions", "created", "exports", "format_version", "threshold", "threshold_history",
                "reader_rule", "reader_rule_history")  # fmt: skip
# The SHA-256 of each image adapted on, one per line, sorted: whether an image was among them can be checked without
# the package holding names (which may identify patients).
IMAGES_FILE = "adaptation-images.sha256"
# Files of the source package that describe it and not the adapted weights (examples' probabilities, fp16 parity).
_LEFT_BEHIND = ("examples.csv", "parity.json")


class AdaptError(AlnusError):
    """The package or the images cannot be used for adaptation."""


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class _Reached(Exception):
    """Raised by a hook to end a forward pass once the layer being estimated has seen its input."""


def _execution_order(
    model: nn.Module, layers: list[nn.modules.batchnorm._BatchNorm], batch: torch.Tensor
) -> tuple[list[nn.modules.batchnorm._BatchNorm], int]:
    """`layers` in the order a forward pass reaches them (a layer the pass never reaches is left out), and the bytes of
    the largest input one image gives a layer."""
    order: list[nn.modules.batchnorm._BatchNorm] = []
    largest = 0

    def note(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        nonlocal largest
        largest = max(largest, args[0][:1].numel() * args[0].element_size())
        if module not in order:
            order.append(module)

    hooks = [bn.register_forward_pre_hook(note) for bn in layers]
    try:
        with torch.no_grad():
            model(batch[:2])
    finally:
        for hook in hooks:
            hook.remove()
    return order, largest


def one_pass_memory() -> int:
    """The bytes a one-pass estimate may use: `ONE_PASS_SHARE` of the memory available now (Linux's MemAvailable),
    else `ONE_PASS_FALLBACK`."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(ONE_PASS_SHARE * int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return ONE_PASS_FALLBACK


def adapt_batchnorm(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    *,
    progress: Callable[[int, int], None] | None = None,
    memory: int | None = None,
    note: Callable[[str], None] | None = None,
) -> int:
    """Set the running mean and variance of every BatchNorm layer of `model` to the population statistics of its
    input over all images of `batches` (each `(B, C, H, W)` on the model's device), as the adapted network computes
    them: AdaBN's target. The affine weights and every other parameter stay. Returns the number of images; the model
    is left in eval mode; `progress(done, layers)` is called as layers are estimated.

    A layer's input depends on the statistics of the layers before it. When the activations of all images together
    fit in about `memory` bytes (default: `one_pass_memory()`), one training-mode pass over all of them at once
    gives every layer its statistics (each layer normalising with those of the whole set). Otherwise the layers are
    estimated one at a time in the order the forward pass reaches them, each from an eval-mode pass that stops at
    that layer (one partial pass per layer). Both give the same statistics whatever the batching, up to the factor n
    / (n - 1) between the biased variance a training-mode pass normalises with and the unbiased one it keeps (n: the
    pixels per channel of a layer's input over all images). `note` is told when the slower, layer-by-layer way is
    taken.

    Raises:
        AdaptError: the model has no BatchNorm layer, or fewer than `MIN_IMAGES` images came (the statistics are
            then left as they were).
    """
    layers = batchnorm_layers(model)
    if not layers:
        raise AdaptError(f"{type(model).__name__} has no BatchNorm layer: there are no statistics to adapt.")
    batches = [batch for batch in batches if len(batch)]
    seen = sum(len(batch) for batch in batches)
    if seen < MIN_IMAGES:
        raise AdaptError(
            f"{seen} image(s) were read; BatchNorm statistics need at least {MIN_IMAGES} (a few hundred is better). "
            "Give more images of the site."
        )
    model.eval()
    order, largest = _execution_order(model, layers, batches[0])
    kept = [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()) for bn in order]
    try:
        # A forward pass holds a few activations of the largest size at once.
        needed, memory = 4 * largest * seen, one_pass_memory() if memory is None else memory
        if needed <= memory:
            _in_one_pass(model, order, torch.cat(batches))
            if progress is not None:
                progress(len(order), len(order))
        else:
            if note is not None:
                note(
                    f"the activations of {seen} images at once (about {needed / 2**30:.1f} GiB) do not fit in the "
                    f"{memory / 2**30:.1f} GiB at hand: estimating the {len(order)} BatchNorm layers one at a time, "
                    "one partial pass over the images each (slower; the result is the same)."
                )
            for done, bn in enumerate(order, start=1):
                _estimate_layer(model, bn, batches)
                if progress is not None:
                    progress(done, len(order))
    except BaseException:  # out of memory, interrupted: the statistics stay as they were, not half adapted
        for bn, (mean, var, _) in zip(order, kept, strict=True):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        raise
    finally:
        for bn, (_, _, count) in zip(order, kept, strict=True):
            bn.num_batches_tracked.copy_(count)
    return seen


def _in_one_pass(model: nn.Module, order: list[nn.modules.batchnorm._BatchNorm], images: torch.Tensor) -> None:
    momenta = [bn.momentum for bn in order]
    try:
        for bn in order:
            bn.reset_running_stats()
            bn.momentum = None  # the running statistics become those of the one batch
            bn.train()
        with torch.no_grad():
            model(images)
    finally:
        for bn, momentum in zip(order, momenta, strict=True):
            bn.momentum = momentum
        model.eval()


def _estimate_layer(model: nn.Module, bn: nn.modules.batchnorm._BatchNorm, batches: list[torch.Tensor]) -> None:
    # Per batch: the channels' pixel count, mean and sum of squared deviations, merged exactly (Chan et al.).
    count, mean, squares = 0, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)

    def merge(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        nonlocal count, mean, squares
        x = args[0].detach().float()
        dims = [d for d in range(x.dim()) if d != 1]
        n = x.numel() // x.shape[1]
        var, mu = torch.var_mean(x, dim=dims, correction=0)
        mu, m2 = mu.double().cpu(), var.double().cpu() * n
        if count == 0:
            count, mean, squares = n, mu, m2
        else:
            delta, total = mu - mean, count + n
            mean = mean + delta * (n / total)
            squares = squares + m2 + delta * delta * (count * n / total)
            count = total
        raise _Reached

    hook = bn.register_forward_pre_hook(merge)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(batch)
                except _Reached:
                    pass
    finally:
        hook.remove()
    bn.running_mean.copy_(mean.to(bn.running_mean))
    bn.running_var.copy_((squares / max(count - 1, 1)).to(bn.running_var))  # unbiased, as BatchNorm keeps it


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

        crops = [dataset[i][0] for i in range(len(dataset))]
        n = adapt_batchnorm(network.model, _batched(crops, batch_size, network.device))
    return n


def check_site(site: str) -> None:
    """A site's name goes into the model card and the notes: letters, digits and simple punctuation, one line."""
    if site and (not SITE_NAME.fullmatch(site) or not site.strip()):
        raise AdaptError(
            f"--site {site!r}: use up to 80 letters, digits, spaces and . , - _ ( ) / + (no line breaks or markup)."
        )


def _is_run_folder(folder: Path) -> bool:
    """A study's run folder, as `alnus run` prepares it (a project folder's own config.yaml does not make one)."""
    return (folder / "splits.csv").is_file() and (folder / "config.yaml").is_file()


def _check_out(source: Path, target: Path, *, force: bool) -> None:
    """Refuse an --out that would overwrite anything but a model package of its own: the source, a folder holding it,
    the current folder or one above it, a run folder's insides, a file or a link; an existing one without `force`."""
    src, out, here = source.resolve(), target.resolve(), Path.cwd().resolve()
    if target.is_symlink():
        raise AdaptError(f"--out {target} is a symbolic link; name a new folder.")
    blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise AdaptError(f"--out {target}: {blocking} is a file, not a folder; name a new folder.")
    if len(os.fsencode(target.name)) > 200:  # the hidden working folder beside it adds a prefix and a suffix
        raise AdaptError(f"--out {target}: the folder name is too long; give a name of at most 200 bytes.")
    if out == src or src in out.parents:
        raise AdaptError(f"--out {target} would write into the source package; name a new folder.")
    if out in src.parents:
        raise AdaptError(
            f"--out {target} holds the source package, which replacing it would delete; name a new folder."
        )
    if out == here or out in here.parents:
        raise AdaptError(f"--out {target} is the current folder or one above it; name a new folder.")
    holder = next((p for p in out.parents if (p / METADATA_FILE).is_file()), None)
    if holder is not None:
        raise AdaptError(f"--out {target} is inside the model package {holder}; name a folder outside any package.")
    run = next((p for p in (out, *out.parents) if _is_run_folder(p)), None)
    if run is not None:
        raise AdaptError(
            f"--out {target} is inside the run folder {run}, whose models its study writes (an adapted model there "
            "would be evaluated on the images it was adapted on); name a folder outside it, e.g. models/<name>."
        )
    if target.exists():
        if not target.is_dir():
            raise AdaptError(f"--out {target} is a file; name a new folder.")
        if not force:
            raise AdaptError(f"{target} exists; name a new folder, or pass --force to replace it.")
        try:
            read_metadata(target)
        except AlnusError:
            raise AdaptError(
                f"--out {target} exists and is not a model package: --force replaces only a package; name a new folder."
            ) from None


def check_inputs_outside(target: str | os.PathLike[str], paths: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse inputs (images, masks, a manifest) inside --out: replacing it with --force would delete them."""
    out = Path(target).resolve()
    for path in filter(None, paths):
        resolved = Path(path).resolve()
        if resolved == out or out in resolved.parents:
            raise AdaptError(
                f"{path} is inside --out {target}, which adapting replaces (deleting what it holds); move the site's "
                "images and manifest out of it, or name another --out."
            )


def _move_into_place(work: Path, source: Path, target: Path, *, force: bool) -> None:
    """Rename the written package folder to `target`; an existing one is replaced only with `force` (checked again:
    another command may have made it meanwhile), and is moved aside before the new one takes its place."""
    if not (target.exists() or target.is_symlink()):
        try:
            os.rename(work, target)  # fails on a folder that appeared meanwhile and holds anything
            return
        except OSError as exc:
            raise AdaptError(
                f"{target} appeared while adapting ({exc.strerror}); nothing was replaced. Run again with a new --out."
            ) from None
    if not force:
        raise AdaptError(f"{target} appeared while adapting (another command?); nothing was replaced.")
    _check_out(source, target, force=True)
    aside = target.with_name(f".{target.name}.replaced-{os.getpid()}")
    os.rename(target, aside)
    os.rename(work, target)
    shutil.rmtree(aside, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _sweep_killed(target: Path) -> None:
    """Folders beside `target` left by an `alnus adapt` that was killed (kill -9) before it could clean up: a half
    written package is removed; a package moved aside to be replaced goes back when nothing took its place, else is
    removed. Only folders named by a process that no longer runs on this machine are touched, so another adapt that is
    writing the same --out meanwhile keeps its own."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:(adapting)-(\d+)\.[a-z0-9_]+|(replaced)-(\d+))")
    for folder in target.parent.glob(f".{glob.escape(target.name)}.*"):
        match = pattern.fullmatch(folder.name)
        if match is None or folder.is_symlink() or not folder.is_dir() or _alive(int(match[2] or match[4])):
            continue
        if match[3] == "replaced" and not (target.exists() or target.is_symlink()):
            with contextlib.suppress(OSError):
                os.rename(folder, target)
                continue
        shutil.rmtree(folder, ignore_errors=True)


def _batched(crops: list[torch.Tensor], batch_size: int, device: torch.device) -> list[torch.Tensor]:
    return [torch.stack(crops[i : i + batch_size]).to(device) for i in range(0, len(crops), batch_size)]


@dataclass
class Adapted:
    """What `adapt_package` did: the new package, the number of images it was adapted on, the files left out (name,
    reason), the warnings of the images used (name, warning: an implausible lesion box, say) and the source's files
    that were not copied, each with why."""

    package: Path
    n_images: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    not_copied: list[str] = field(default_factory=list)


def adapted_on(package_dir: str | os.PathLike[str], paths: Iterable[str]) -> list[str]:
    """Those of `paths` (image files) whose content is among the images `package_dir` was adapted on (its
    `adaptation-images.sha256`): predictions of them are no independent test of the adapted package. Empty when the
    package was not adapted or its list cannot be read."""
    from alnus._io import open_regular

    if not read_metadata(package_dir).get("adaptation"):
        return []
    try:
        with open_regular(Path(package_dir) / IMAGES_FILE) as fh:
            listed = {line.strip() for line in fh.read(64 << 20).decode("ascii", errors="replace").splitlines()}
    except (OSError, AlnusError):
        return []
    found = []
    for path in paths:
        try:
            if path and file_sha256(Path(path)) in listed:
                found.append(path)
        except OSError:
            continue
    return found


def images_digest(paths: Iterable[str | os.PathLike[str]]) -> str:
    """SHA-256 over the sorted SHA-256 of each file's bytes: which images, whatever their order or names."""
    return _digest_of(sorted(file_sha256(Path(p)) for p in paths))


def _digest_of(sorted_digests: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted_digests).encode("ascii")).hexdigest()


def adapt_package(
    package: str | os.PathLike[str],
    inputs: pd.DataFrame,
    out: str | os.PathLike[str],
    *,
    site: str = "",
    batch_size: int = 32,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    layers: Callable[[int, int], None] | None = None,
    note: Callable[[str], None] | None = None,
    max_pixels: int | None = None,
) -> Adapted:
    """Adapt a package's BatchNorm statistics to the images of `inputs` and write it to `out`: its one network, or
    every member of an ensemble (each reading the images with its own preprocessing; the members stay the ensemble's).

    Args:
        package: a model package folder, single network or ensemble.
        inputs: one row per image as `alnus.data.inputs.collect_inputs` returns it (`path`, and `roi` or `mask` where
            the package crops the lesion); a row that cannot be read is skipped and listed in the result.
        out: the new package's folder; it must not exist unless `force`, and never be the source package.
        site: the site's name, recorded in the package.
        progress: called with (images read, images) after each image; `layers` with (layers estimated, layers) of
            the network being adapted; `note` with what the user should know while it runs.

    Raises:
        AdaptError: an `out` that exists (without `force`) or is the source, or too few images.
    """
    from alnus.predict import Predictor

    source, target = Path(package), Path(out)
    meta = read_metadata(source)
    check_site(site)
    _sweep_killed(target)
    _check_out(source, target, force=force)
    check_inputs_outside(target, [*inputs.get("path", []), *inputs.get("mask", [])])
    predictor = Predictor(
        source, device="cpu", precision="fp32", engine="torch", batch_size=batch_size, max_pixels=max_pixels
    )
    records = [{str(k): "" if pd.isna(v) else str(v) for k, v in r.items()} for r in inputs.to_dict("records")]
    skipped: list[tuple[str, str]] = []
    warned: list[tuple[str, str]] = []
    digests: list[str] = []
    first: dict[tuple[str, ...], str] = {}  # an image's content and lesion region -> the first name it came under
    crops: list[list[torch.Tensor]] = [[] for _ in predictor.networks]  # per network, its own preprocessing
    for i, row in enumerate(records):
        name = row.get("image") or row.get("path", "?")
        if row.get("error"):
            skipped.append((name, row["error"]))
        else:
            try:
                tensors, warning = predictor.network_inputs(row)
                digest = file_sha256(Path(row["path"]))
                key = (digest, row.get("roi", ""), row.get("mask", ""), row.get("frame", ""))
                if key in first:  # the same crop again would weigh one image twice in the statistics
                    skipped.append((name, f"same image and lesion region as {first[key]}: counted once"))
                else:
                    first[key] = name
                    for own, tensor in zip(crops, tensors, strict=True):
                        own.append(tensor)
                    digests.append(digest)
                    if warning:
                        warned.append((name, warning))
            except (AlnusError, ValueError, OSError) as exc:
                skipped.append((name, str(exc) or type(exc).__name__))
        if progress is not None:
            progress(i + 1, len(records))
    read, digests = digests, sorted(digests)
    try:
        if len(set(digests)) < MIN_IMAGES <= len(read):
            raise AdaptError(
                f"{len(read)} image(s) were read but only {len(set(digests))} different file(s); BatchNorm statistics "
                f"need at least {MIN_IMAGES} different images."
            )
        for network, own in zip(predictor.networks, crops, strict=True):
            n = adapt_batchnorm(network.model, _batched(own, batch_size, network.device), progress=layers, note=note)
    except AdaptError as exc:
        if skipped and not read:
            raise AdaptError(
                f"none of the {len(skipped)} image(s) could be used: {_reasons(skipped)}. Fix what the reasons say "
                "(a cropping package needs each image's lesion box or mask: --roi, --mask, or a manifest's roi or "
                "mask column) and run again."
            ) from None
        detail = f" {len(skipped)} image(s) were left out: {_reasons(skipped)}." if skipped else ""
        raise AdaptError(f"{exc}{detail}") from None
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    def record(of: dict[str, Any]) -> dict[str, Any]:
        return {
            "method": "batchnorm statistics (AdaBN): running means and variances re-estimated, weights unchanged",
            "site": site,
            "n_images": n,
            "n_skipped": len(skipped),
            "images_sha256": _digest_of(digests),
            "images_list": IMAGES_FILE,
            "source_package": str(source.resolve()),
            "source_weights_sha256": of["weights_sha256"],
            "source_threshold": of.get("threshold"),
            "date": date,
        }

    not_copied: list[str] = []
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.adapting-{os.getpid()}.", dir=target.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(work, 0o777 & ~umask)  # a folder like any other the user makes (mkdtemp's is private)
        if is_ensemble(meta):
            written = _write_ensemble(work, predictor, meta, record)
        else:
            carried = {k: v for k, v in meta.items() if k not in _NOT_CARRIED}
            written = save_package(work, predictor.networks[0].model, {**carried, "adaptation": record(meta)})
        left = {WEIGHTS_FILE, METADATA_FILE, "README.md", IMAGES_FILE, *_LEFT_BEHIND, *EXPORT_FILES.values()}
        for item in source.iterdir():
            if item.name in left or not (item.is_file() or item.is_symlink()):
                continue
            if item.is_symlink():  # never followed: a link could point at any file the user may read
                not_copied.append(f"{item.name} (a symbolic link; copy the file it points to into {target} by hand)")
            else:
                shutil.copy2(item, work / item.name)  # the data licence, for one
        atomic_write_text(work / IMAGES_FILE, "".join(f"{d}\n" for d in digests))
        atomic_write_text(work / "README.md", _card(source, written, meta.get("adaptation")))
        Predictor(work, device="cpu", precision="fp32", engine="torch")  # reads back as every reader will
        _move_into_place(work, source, target, force=force)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Adapted(target, n, skipped, written, warned, not_copied)


def _reasons(skipped: list[tuple[str, str]], shown: int = 3) -> str:
    """Why images were left out, each distinct reason once with how many it hit and one image it names."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped:
        text = reason[len(name) :].lstrip(": ") if reason.startswith(name) else reason
        by_reason.setdefault(text.rstrip(". "), []).append(name)
    parts = [
        f"{text} ({names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''})"
        for text, names in list(by_reason.items())[:shown]
    ]
    rest = len(by_reason) - shown
    return "; ".join(parts) + (f"; and {rest} other reason(s)" if rest > 0 else "")


def _write_ensemble(
    work: Path, predictor: Predictor, meta: dict[str, Any], record: Callable[[dict[str, Any]], dict[str, Any]]
) -> dict[str, Any]:
    """An adapted ensemble in `work`: each member a package of its adapted network (with its own adaptation record),
    the ensemble's metadata naming the new members' weights; returns the ensemble's metadata."""
    members = [dict(m) for m in meta["members"]]
    for i, (network, member) in enumerate(zip(predictor.networks, members, strict=True), start=1):
        own = {k: v for k, v in network.metadata.items() if k not in _NOT_CARRIED}
        written = save_package(
            work / MEMBERS_DIR / str(i), network.model, {**own, "adaptation": record(network.metadata)}
        )
        member["weights_sha256"] = written["weights_sha256"]
    ensemble = {k: v for k, v in meta.items() if k not in _NOT_CARRIED}
    ensemble.update({
        "members": members,
        "weights_sha256": ensemble_digest([m["weights_sha256"] for m in members]),
        "threshold": None,
        "threshold_history": [],
        "reader_rule": None,
        "exports": {},
        "adaptation": record(meta),
        "versions": {"alnus": alnus.__version__},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    })  # fmt: skip
    ensemble["format_version"] = format_version_of(ensemble)
    atomic_write_text(work / METADATA_FILE, json.dumps(ensemble, indent=2, default=str) + "\n")
    return ensemble


def _card(source: Path, meta: dict[str, Any], earlier: dict[str, Any] | None) -> str:
    """The adapted package's model card: what adaptation did and what no longer holds first, then the source package's
    card (its own sections, for the intended use and training sites; only when it is a regular file,
    `alnus.predict.read_card`), marked as describing the model before adaptation. `earlier`: the source's own
    adaptation record, when the source was adapted already."""
    from alnus.predict import read_card
    from alnus.reader_rule import without_card_block

    adaptation = meta["adaptation"]
    card = read_card(source).strip()
    lines = card.splitlines()
    title = lines[0][2:].strip() if lines and lines[0].startswith("# ") else source.name
    if earlier:  # adapted again: the earlier site's statistics are replaced, not added to
        title = re.sub(r", adapted( to .*)?$", "", title)
    body = "\n".join(lines[1:] if lines and lines[0].startswith("# ") else lines).strip()
    if earlier and BEFORE_ADAPTATION in body:  # the original card, without the earlier adaptation's sections
        body = body.split(BEFORE_ADAPTATION, 1)[1].strip().split("\n\n", 1)[-1].strip()
    # The source's reader rule is not carried over: its block goes, so a rule set later is written in its place here.
    body, had_rule = without_card_block(body)
    site = f" to {adaptation['site']}" if adaptation["site"] else ""
    threshold = adaptation["source_threshold"]
    was = f" (the source's, {threshold['value']:.4g}, was frozen before adaptation)" if threshold else ""
    members = f", each of its {len(meta['members'])} members" if is_ensemble(meta) else ""
    out = [
        f"# {title}, adapted{site}",
        "",
        "## Site adaptation",
        "",
        f"These are the weights of the source package ({source.name}{', whose card follows' if body else ''})"
        f"{members} with their BatchNorm statistics re-estimated on {adaptation['n_images']} unlabelled "
        f"image(s){' of ' + adaptation['site'] if adaptation['site'] else ''} on {adaptation['date'][:10]} (`alnus "
        "adapt`); every other weight is the source's and no label was read. Its weights SHA-256 is "
        f"`{meta['weights_sha256'][:16]}` (the source's: `{adaptation['source_weights_sha256'][:16]}`). The SHA-256 of "
        f"each image adapted on is in `{IMAGES_FILE}`: those images, and their patients, are no independent test of "
        "this package."
        + (
            f" The source was itself adapted (to {earlier.get('site') or 'a site'}); those statistics are replaced."
            if earlier
            else ""
        ),
        "",
        SITE_THRESHOLD_START,
        f"No threshold is carried over{was}: the adapted probabilities move, so calls need a threshold frozen on "
        "labelled validation patients of this site (`alnus threshold`)."
        + (" Nor is the source's reader rule (`alnus reader-rule` sets one on them)." if had_rule else ""),
        SITE_THRESHOLD_END,
    ]
    if body:
        out += [
            "",
            BEFORE_ADAPTATION,
            "",
            "Everything below describes the source model as it was trained and evaluated: its weights hash, threshold, "
            "results and exports are the source's, not this package's.",
            "",
            body,
        ]
    return "\n".join(out) + "\n"


def freeze_on_labelled(
    package_dir: str | os.PathLike[str],
    manifest: str | os.PathLike[str],
    *,
    rule: Literal["youden", "sensitivity", "specificity"] | None = None,
    target: float | None = None,
    level: Literal["image", "patient", "study"] | None = None,
    aggregate: Literal["mean", "max"] | None = None,
    refreeze: bool = False,
    max_pixels: int | None = None,
) -> dict[str, Any]:
    """Freeze a package's threshold on the labelled validation patients of a site (a manifest with `label` and
    `patient_id`), as `alnus evaluate` freezes a run's on its validation split; returns the frozen operating point.

    For a package made by `alnus adapt` (or any package that carries none) this is how it gets calls. Settings left
    None follow the package's current threshold, else the one its adaptation came from, else Youden per patient on
    the mean probability. Predictions are made in fp32 with PyTorch, the reference every engine reproduces. The model
    card, when the package has one, gets a section saying where the threshold was frozen.
    """
    from alnus.evaluate import choose_frozen_threshold
    from alnus.models.package import freeze_threshold
    from alnus.predict import MAX_CARD_BYTES, Predictor, read_card

    package_dir, manifest = Path(package_dir), Path(manifest)
    meta = read_metadata(package_dir)
    run = next((p for p in package_dir.resolve().parents if _is_run_folder(p)), None)
    if run is not None:
        raise AdaptError(
            f"{package_dir} is a model of the run {run}: its threshold is frozen on the run's validation split by "
            f"`alnus evaluate {run}` (`--refreeze` to choose it again). `alnus threshold` is for a package on its own "
            "(an adapted one, or a copy outside the run)."
        )
    holder = package_dir.resolve().parent.parent
    if package_dir.resolve().parent.name == MEMBERS_DIR and (holder / METADATA_FILE).is_file():
        raise AdaptError(
            f"{package_dir} is a member of the ensemble {holder}, which makes the calls: freeze the ensemble's "
            f"threshold (`alnus threshold {holder} ...`), not a member's."
        )
    if meta["threshold"] is not None and not refreeze:
        raise AdaptError(
            f"{package_dir} already has a frozen threshold ({meta['threshold']['value']:.4g}, "
            f"{rule_name(meta['threshold'])}); pass --refreeze to replace it."
        )
    if rule == "youden" and target is not None:
        raise AdaptError("--target is for the sensitivity and specificity rules; Youden's takes none.")
    if target is not None and not 0 < target <= 1:
        raise AdaptError(f"--target {target} must be a proportion in (0, 1], e.g. 0.9.")
    table, _ = labelled_table(manifest, meta, "a threshold is chosen", max_pixels)
    _both_classes(table, manifest, meta, "a threshold is chosen")
    before = meta["threshold"] or (meta.get("adaptation") or {}).get("source_threshold") or {}
    rule = rule or before.get("rule", "youden")
    level = level or before.get("level", "patient")
    aggregate = aggregate or before.get("aggregate", "mean")
    if target is None and rule != "youden":
        target = before.get("target") if before.get("rule") == rule else None
        if target is None:
            raise AdaptError(f"rule {rule} needs a target (e.g. --target 0.9).")
    predictor = Predictor(package_dir, device="cpu", precision="fp32", engine="torch", max_pixels=max_pixels)
    _refuse_training_images(predictor, table, manifest, package_dir, "a threshold", max_pixels)
    predictions = predictor.predict_table(table, manifest.parent)
    wanted = choose_frozen_threshold(predictions, rule=rule, target=target, level=level, aggregate=aggregate)
    wanted["frozen_on"] = f"{manifest.name} (labelled validation patients given to `alnus threshold`)"
    old = meta["threshold"]
    unchanged = (
        old is not None
        and same_rule(old, wanted)
        and old["value"] == wanted["value"]
        and (old.get("frozen_on"), old.get("chosen_on")) == (wanted["frozen_on"], wanted.get("chosen_on"))
    )
    if unchanged:
        point = old  # the same rule on the same patients gives the same threshold: nothing new to record
    else:
        reason = f"frozen by `alnus threshold` on {manifest.name} ({len(predictions)} images, labelled)"
        point = freeze_threshold(package_dir, wanted, reason=reason, refreeze=refreeze)["threshold"]
    # The card is written again either way, so a card left behind by an interrupted run is brought up to date.
    card = read_card(package_dir)
    card_path = package_dir / "README.md"
    if card and card_path.stat().st_size <= MAX_CARD_BYTES:  # a longer card is only partly read: left as it is
        chosen = point["chosen_on"]
        text = (
            f"Threshold {point['value']:.4g} ({rule_name(point)}, {describe(point)}), frozen by `alnus threshold` on "
            f"{point['frozen_at'][:10]} on {manifest.name}: {chosen['n_cases']} {level} cases ({chosen['n_pos']} "
            f"{meta['positive_label']}), where it gives sensitivity {100 * point['val_sensitivity']:.1f}% and "
            f"specificity {100 * point['val_specificity']:.1f}% (measured on the cases it was chosen on, so "
            "optimistic). `alnus predict` and the service apply it."
        )
        atomic_write_text(package_dir / "README.md", _with_site_threshold(card, text))
    return point


# What makes two packages give the same probabilities.
_SCORING = ("weights_sha256", "preprocess", "tta")


@dataclass
class SiteScore:
    """`score_on_labelled`'s answer: one row per package (AUC per patient with its CI; sensitivity and specificity at
    the package's frozen threshold, where it has one) and, for two packages, the paired DeLong comparison."""

    rows: pd.DataFrame
    n_patients: int
    n_positive: int
    comparison: Any = None
    # Per package: its reader rule against the radiologist alone on these patients (None: no rule or no readings).
    with_reader: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    left_out: str = ""  # the manifest's rows of other classes than the model's, left out ("" when none)
    # Two packages with frozen thresholds at one level: their calls compared on the same cases, per metric
    # (`stats.McNemarResult`, first minus second), or a str saying why they are not.
    calls: dict[str, Any] | str | None = None
    # The images among these that a package learned from (`alnus.data.seen`), in words ("" when none).
    seen: str = ""


def score_on_labelled(
    packages: Sequence[str | os.PathLike[str]], manifest: str | os.PathLike[str], *, max_pixels: int | None = None
) -> SiteScore:
    """Score packages on the labelled patients of a site: the AUC per patient (mean probability of a patient's images)
    with its DeLong CI, and each package's calls at its own frozen threshold. With two packages (an adapted one and
    its source, say) the first minus the second is tested with DeLong's paired test on the same patients. A package
    with a reader rule, on a manifest with readings, also gets the rule against the radiologist alone
    (`SiteScore.with_reader`). Predictions are made in fp32 with PyTorch, the reference every engine reproduces."""
    from alnus import stats
    from alnus.evaluate import aggregate_predictions
    from alnus.predict import Predictor

    manifest = Path(manifest)
    metas = [read_metadata(package) for package in packages]
    for package, meta in zip(packages[1:], metas[1:], strict=True):
        if (meta["label_names"], meta["positive_label"]) != (metas[0]["label_names"], metas[0]["positive_label"]):
            raise AdaptError(
                f"{package} has labels {meta['label_names']} (positive {meta['positive_label']!r}), {packages[0]} "
                f"{metas[0]['label_names']} (positive {metas[0]['positive_label']!r}); compare packages of one label."
            )
    same_scores = len(metas) == 2 and all(metas[0].get(k) == metas[1].get(k) for k in _SCORING)
    if same_scores and all(metas[0].get(k) == metas[1].get(k) for k in ("threshold", "reader_rule")):
        raise AdaptError(
            f"{packages[0]} and {packages[1]} have the same weights (sha256 {metas[0]['weights_sha256'][:12]}), "
            "preprocessing, threshold and reader rule, so they give the same probabilities and calls and the "
            "comparison would say nothing; compare two different packages (an adapted one and its source, say), or "
            "score one."
        )
    # Checked once, for both; rows of classes the model does not know are left out and named.
    table, left_out = labelled_table(manifest, metas[0], "a package is scored", max_pixels, leave_out=True)
    _both_classes(table, manifest, metas[0], "an AUC is computed", left_out)
    rows, scores, calls, seen_notes = [], [], [], []
    with_reader: dict[str, dict[str, Any] | None] = {}
    for package, meta in zip(packages, metas, strict=True):
        predictor = Predictor(package, device="cpu", precision="fp32", engine="torch", max_pixels=max_pixels)
        predictions = predictor.predict_table(table, manifest.parent)
        seen_notes.append(_seen_among(predictor, table, manifest.parent, package, max_pixels))
        cases = aggregate_predictions(predictions, "patient", "mean")
        y = cases["y"].to_numpy()
        auc = stats.auc_ci(y, cases["prob"].to_numpy())
        row = {"package": str(package), "AUC": auc.estimate, "AUC low": auc.ci_low, "AUC high": auc.ci_high}
        point = meta["threshold"]
        if point is not None:
            at = aggregate_predictions(predictions, point["level"], point["aggregate"])
            called, truth = at["prob"].to_numpy() >= point["value"], at["y"].to_numpy() == 1
            row["threshold"] = point["value"]
            row["sensitivity"] = f"{int((called & truth).sum())}/{int(truth.sum())}"
            row["specificity"] = f"{int((~called & ~truth).sum())}/{int((~truth).sum())}"
            calls.append((point["level"], point["aggregate"], truth, called))
        rows.append(row)
        scores.append(cases["prob"].to_numpy())
        with_reader[str(package)] = _rule_on_site(table, predictions, meta)
    # The same probabilities (a package re-thresholded at a site against its source): their calls differ, their AUCs
    # cannot, so there is no AUC test to make.
    comparison = stats.delong_test(y, scores[0], scores[1]) if len(scores) == 2 and not same_scores else None
    return SiteScore(pd.DataFrame(rows), len(y), int(y.sum()), comparison, with_reader, left_out,
                     _compare_calls(calls) if len(packages) == 2 else None,
                     " ".join(dict.fromkeys(n for n in seen_notes if n)))  # fmt: skip


def _seen_among(
    predictor: Any, table: pd.DataFrame, root: Path, package: str | os.PathLike[str], max_pixels: int | None
) -> str:
    """What to say when some of the scored images are images the package learned from ("" when none, or when the
    package does not list them)."""
    hits = [i for i, _ in _development_hits(predictor, table, root, max_pixels)]
    if not hits:
        return ""
    patients = table["patient_id"].iloc[hits].astype(str).nunique() if "patient_id" in table.columns else len(hits)
    return (f"{len(hits)} of the {len(table)} images ({patients} patient(s), e.g. {table['image'].iloc[hits[0]]}) "
            f"are images {package} was trained or selected on: these numbers are not a test of it; score it on "
            "patients it never saw.")  # fmt: skip


def _development_hits(predictor: Any, table: pd.DataFrame, root: Path, max_pixels: int | None) -> list[tuple[int, str]]:
    """(row position, split) of each image of `table` that the package learned from: `train` or `val` (none when the
    package does not list its development images)."""
    from alnus.data.images import load_image, parse_frame

    if predictor.seen is None:
        return []
    frames = table["frame"] if "frame" in table.columns else pd.Series("", index=table.index)
    hits = []
    for i, (image, frame) in enumerate(zip(table["image"].astype(str), frames, strict=True)):
        path = Path(image) if Path(image).is_absolute() else root / image
        frame = "" if pd.isna(frame) else str(frame)
        found = predictor.seen.match(load_image(path, frame=parse_frame(frame), max_pixels=max_pixels))
        if found is not None:
            hits.append((i, found[0]))
    return hits


def _refuse_training_images(
    predictor: Any, table: pd.DataFrame, manifest: Path, package: Path, what: str, max_pixels: int | None
) -> None:
    """Refuse to set `what` on images the package was trained on: its probabilities there are those of its own
    training data, so a value chosen on them does not hold for new patients. Its validation images are allowed (they
    are where `alnus evaluate` froze it)."""
    trained = [i for i, split in _development_hits(predictor, table, manifest.parent, max_pixels) if split == "train"]
    if not trained:
        return
    rows = ", ".join(str(int(table.index[i]) + 2) for i in trained[:5]) + (" ..." if len(trained) > 5 else "")
    patients = table["patient_id"].iloc[trained].astype(str).nunique()
    raise AdaptError(
        f"{manifest}: {len(trained)} of the {len(table)} images ({patients} patient(s); rows {rows}, e.g. "
        f"{table['image'].iloc[trained[0]]}) are images {package} was trained on (or near copies of them): {what} "
        "set on them would fit the model's own training data and not hold for new patients. Remove those patients' "
        "rows, or use labelled patients the model never saw."
    )


def _refuse_run_test_images(table: pd.DataFrame, manifest: Path, package: Path, what: str) -> None:
    """For a package of a run: refuse to set `what` on the run's internal or external test images (by content), which
    must stay unseen by every choice the model carries; the run's validation patients are where it is set."""
    from alnus.runfolder import read_splits

    run = next((p for p in package.resolve().parents if _is_run_folder(p)), None)
    if run is None:
        return
    splits = read_splits(run)
    tests = splits[splits["split"].isin(("internal_test", "external_test"))]
    held = {}
    for image in tests["image"].astype(str):
        path = Path(image) if Path(image).is_absolute() else run / image
        with contextlib.suppress(OSError, AlnusError):  # a test image moved away cannot be among these
            held[file_sha256(path)] = image
    found = []
    for position, image in enumerate(table["image"].astype(str)):
        path = Path(image) if Path(image).is_absolute() else manifest.parent / image
        with contextlib.suppress(OSError, AlnusError):
            if file_sha256(path) in held:
                found.append(position)
    if found:
        rows = ", ".join(str(int(table.index[i]) + 2) for i in found[:5]) + (" ..." if len(found) > 5 else "")
        raise AdaptError(
            f"{manifest}: {len(found)} of the {len(table)} images (rows {rows}, e.g. {table['image'].iloc[found[0]]}) "
            f"are test images of the run {run} that {package} belongs to: {what} set on them would make its results "
            "on those patients optimistic. Set it on the run's validation patients (the val rows of "
            f"{run / 'splits.csv'})."
        )


def _compare_calls(calls: list[tuple[str, str, np.ndarray, np.ndarray]]) -> dict[str, Any] | str | None:
    """The two packages' calls on the same cases: exact McNemar tests of sensitivity and specificity (first minus
    second); why not when one has no threshold or the two call at different levels."""
    from alnus import stats

    if len(calls) < 2:
        which = "neither package has" if not calls else "only one of the two packages has"
        return f"{which} a frozen threshold, so their calls cannot be compared"
    (level, _, truth, first), (level2, _, truth2, second) = calls
    if level != level2 or truth.size != truth2.size:
        return (f"their thresholds call at different levels ({level} vs {level2}), so their calls are not of the "
                "same cases")  # fmt: skip
    found: dict[str, Any] = {"level": level, "n": int(truth.size)}
    for metric, subset in (("sensitivity", "positives"), ("specificity", "negatives")):
        found[metric] = stats.mcnemar_test(truth, first, second, subset=subset)
    return found


def _both_classes(
    table: pd.DataFrame, manifest: Path, meta: Mapping[str, Any], purpose: str, left_out: str = ""
) -> None:
    """Refuse, before any image is predicted, a labelled manifest whose rows are all of one class."""
    present = sorted(set(table["label"].astype(str)))
    if len(present) < 2:
        also = f" ({left_out})" if left_out else ""
        raise AdaptError(
            f"{manifest} has patients of one class only ({present[0]!r}); {purpose} on patients of both of the "
            f"model's labels {[str(n) for n in meta['label_names']]}: give a manifest with both.{also}"
        )


def _rule_on_site(table: pd.DataFrame, predictions: pd.DataFrame, meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The package's reader rule against the radiologist alone on these patients (`reader_rule_on_test`), when the
    package has a rule and the manifest has readings (its `birads` column, else the rule's own, else reader_birads);
    None otherwise, or the reason it cannot be scored."""
    from alnus.evaluate import reader_rule_on_test
    from alnus.reader_rule import reading_columns

    rule = meta.get("reader_rule")
    if rule is None:
        return None
    column = next((c for c in reading_columns(rule) if c in table.columns), None)
    if column is None:
        return None
    try:
        return reader_rule_on_test(table, predictions, column, rule)
    except AlnusError as exc:
        return {"reader": column, "error": str(exc)}


def _with_site_threshold(card: str, text: str) -> str:
    """The card with its site-threshold section replaced (or added after the title)."""
    block = f"{SITE_THRESHOLD_START}\n{text}\n{SITE_THRESHOLD_END}"
    head, start, rest = card.partition(SITE_THRESHOLD_START)
    if start and SITE_THRESHOLD_END in rest:
        return head + block + rest.split(SITE_THRESHOLD_END, 1)[1]
    title, _, rest = card.partition("\n")
    superseded = (
        "It replaces any operating threshold stated further down; the results further down were measured at that one."
    )
    return f"{title}\n\n## Threshold frozen at a site\n\n{block}\n\n{superseded}\n{rest}"


def freeze_reader_rule(
    package_dir: str | os.PathLike[str],
    manifest: str | os.PathLike[str],
    *,
    column: str = "reader_birads",
    positive_from: str = "4a",
    refreeze: bool = False,
    max_pixels: int | None = None,
    described_as: str | None = None,
) -> dict[str, Any]:
    """Set a package's reader rule on a site's labelled validation patients with their BI-RADS (a manifest with
    image, label, patient_id, the lesion boxes and the reader's `column`); returns the rule as written.

    The images are predicted in fp32 with PyTorch (the reference every engine reproduces); a patient's images are
    combined as the package's threshold combines them (a package without a threshold: the mean per patient). Where
    the rule was set is recorded as the manifest's name, or `described_as`.
    """
    from alnus._text import printable
    from alnus.evaluate import reader_rule_on_validation
    from alnus.models.package import package_lock, set_reader_rule
    from alnus.predict import Predictor
    from alnus.reader_rule import BIRADS_COLUMNS, ReaderRuleError, check_rule_request

    package_dir, manifest = Path(package_dir), Path(manifest)
    meta = read_metadata(package_dir)
    if meta.get("reader_rule") is not None and not refreeze:
        raise ReaderRuleError(
            f"{package_dir} already has a reader rule ({meta['reader_rule']['value']:.4g}, set "
            f"{meta['reader_rule'].get('frozen_at', 'earlier')}); pass --refreeze to replace it."
        )
    check_rule_request(column, positive_from)
    table, _ = labelled_table(manifest, meta, "a reader rule is set", max_pixels)
    _both_classes(table, manifest, meta, "a reader rule is set")
    if column not in table.columns:
        found = ", ".join(c for c in table.columns if c.startswith("reader_") or c in BIRADS_COLUMNS) or "none"
        raise ReaderRuleError(
            f"{manifest} has no column {column!r} of BI-RADS readings (reader columns found: {found}); name it "
            "with --reader."
        )
    from alnus.readers import birads_problem, no_reading

    bad = next(((i, v) for i, v in table[column].items() if not no_reading(v) and birads_problem(v)), None)
    if bad is not None:  # said before any image is predicted, naming the file
        raise ReaderRuleError(
            f"{manifest}: row {bad[0] + 2}, column {column}: {birads_problem(bad[1])}. Correct the cell (or leave it "
            "empty: no reading) and run again."
        )
    point = meta.get("threshold") or {}
    level, aggregate = point.get("level", "patient"), point.get("aggregate", "mean")
    _refuse_run_test_images(table, manifest, package_dir, "a reader rule")
    predictor = Predictor(package_dir, device="cpu", precision="fp32", engine="torch", max_pixels=max_pixels)
    _refuse_training_images(predictor, table, manifest, package_dir, "a reader rule", max_pixels)
    predictions = predictor.predict_table(table, manifest.parent)
    rule = reader_rule_on_validation(table, predictions, column, positive_from=positive_from, level=level,
                                     aggregate=aggregate)  # fmt: skip
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    where = described_as or f"{manifest.name} (labelled validation patients given to `alnus reader-rule`)"
    rule |= {"frozen_on": printable(where), "frozen_at": now}
    # metadata.json and the card change together, so no other writer sees (or leaves) one without the other.
    with package_lock(package_dir):
        meta = set_reader_rule(package_dir, rule, refreeze=refreeze)
        carded = write_card_section(package_dir, meta["reader_rule"], meta)
    return meta["reader_rule"], carded


def remove_card_section(package_dir: str | os.PathLike[str]) -> tuple[int, str]:
    """Take every reader-rule block out of the package's model card: how many went, and what is left to fix by hand
    ("" when nothing: a card that is a link or too long to rewrite, or a lone marker left without its pair)."""
    from alnus.predict import MAX_CARD_BYTES, read_card
    from alnus.reader_rule import CARD_END, CARD_START, without_card_block

    path = Path(package_dir) / "README.md"
    if path.is_symlink() or (path.is_file() and path.stat().st_size > MAX_CARD_BYTES):
        return 0, f"{path} is a symbolic link or over 1 MB, so it was not changed: check it for a rule by hand"
    card = read_card(Path(package_dir))
    removed, had = 0, True
    while had:
        card, had = without_card_block(card)
        removed += had
    if removed:
        atomic_write_text(path, card.rstrip("\n") + "\n")
    lone = next((i for i, line in enumerate(card.splitlines(), start=1) if line.strip() in (CARD_START, CARD_END)), 0)
    left = f"{path} still has a reader-rule marker on line {lone} without its pair: remove it by hand" if lone else ""
    return removed, left


def write_card_section(package_dir: str | os.PathLike[str], record: Mapping[str, Any], meta: Mapping[str, Any]) -> bool:
    """Put the rule's block into the package's model card: in place of an earlier one (`card_block_span`), else after
    the card's operating-threshold section (in an adapted package's card, before the source model's part), else at
    its end. False when the package has no card (or one too long to read)."""
    from alnus.predict import MAX_CARD_BYTES, read_card
    from alnus.reader_rule import card_block_span
    from alnus.report.card import card_block

    path = Path(package_dir) / "README.md"
    card = read_card(Path(package_dir))
    if not card or path.stat().st_size > MAX_CARD_BYTES:
        return False
    block = card_block(record, meta)
    lines = card.splitlines()
    span = card_block_span(lines)
    if span is not None:
        lines[span[0] : span[1] + 1] = block
    else:
        source = next((i for i, line in enumerate(lines) if line.strip() == BEFORE_ADAPTATION), None)
        own = lines if source is None else lines[:source]
        at = next((i for i, line in enumerate(own) if line.startswith("## Operating threshold")), None)
        after = None if at is None else next((i for i in range(at + 1, len(own)) if own[i].startswith("## ")), None)
        where = after if after is not None else source
        if where is None:
            lines += ["", *block]
        else:
            lines[where:where] = [*([""] if where and lines[where - 1].strip() else []), *block, ""]
    atomic_write_text(path, "\n".join(lines).rstrip("\n") + "\n")
    return True
