"""What an ingest is made of, as a rerun compares it with the earlier one: the annotation file's
digest, the image location, a listing by name and size of the image files the annotation file
names (one listing of the folder; no image is read), and the shard size.

``_annotated_files.json`` beside an ingest's manifest lists the files its annotation file names
(with that file's sha256: it is written before the manifest, and belongs to the manifest of the
same annotation file), so that other files under the image folder (a ``.DS_Store``, notes,
predictions written beside the images, the images of another split) change nothing. Ray-free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

from centernet_ray import lease, storage
from centernet_ray.data.coco import ImageRecord, no_images_found
from centernet_ray.errors import UserInputError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "_manifest.json"
ANNOTATED_FILES = "_annotated_files.json"  # the files the ingested annotation file names, as the listing names them


def fingerprint(annotations_digest: Any, images: str, images_listing: str, shard_size: int) -> str:
    """``annotations_digest`` (the annotation file's ``hashlib.sha256``, left as it is) extended with
    the image location, its listing (``images_listing``) and the shard size."""
    fs, path = storage.resolve(images)  # "/data/x" and "file:///data/x" are the same input
    digest = annotations_digest.copy()
    digest.update(f"|{fs.type_name}:{path}|{images_listing}|{shard_size}|v{FORMAT_VERSION}".encode())
    return digest.hexdigest()


def list_images(images: str) -> dict[str, int] | None:
    """The files under ``images`` (names relative to it, sizes in bytes) from one listing, without
    reading any; an ingest's own files (shards, manifest and annotated files, in a folder that holds
    a manifest; leases and reader marks) are left out, should one lie among the images. None, with
    a warning, when the listing is refused (credentials that may read objects but not list them)."""
    try:
        sizes = storage.file_sizes(images)
    except NotADirectoryError:
        raise UserInputError(f"{images} is a file, not a folder of images") from None
    except OSError as exc:
        log.warning("ingest: cannot list %s (%s): images changed in place since the last ingest are not noticed "
                    "(rerun with --force to ingest them)", images, exc)
        return None
    ingests = {posixpath.dirname(name) for name in sizes if posixpath.basename(name) == MANIFEST}

    def is_ingest_output(name: str) -> bool:
        folder, base = posixpath.split(name)
        ours = base in (MANIFEST, ANNOTATED_FILES) or base.startswith("part-")
        return base.startswith(lease.LEASE_FILE) or folder in ingests and ours

    return {name: size for name, size in sizes.items() if not is_ingest_output(name)}


def images_listing(files: dict[str, int] | None) -> str:
    """The sha256 of ``list_images``' answer (``"unlisted"`` for none): an image added, removed or
    replaced in place (a corrupt one fixed) changes it. Not the modification times: copies of a
    dataset on several nodes, or the synthetic shapes each node generates, differ in them and are
    the same input."""
    if files is None:
        return "unlisted"
    digest = hashlib.sha256()
    for name, size in sorted(files.items()):
        digest.update(f"{name}\0{size}\n".encode())
    return digest.hexdigest()


def annotated_files(records: list[ImageRecord]) -> list[str]:
    """The file names of ``records`` as a listing of their folder gives them (``./a.jpg`` is ``a.jpg``)."""
    return [posixpath.normpath(record.file_name) for record in records]


def require_some_images(records: list[ImageRecord], images: str, annotations: str,
                        files: dict[str, int] | None) -> None:
    """Refuse, before anything is deleted or written, a folder that holds none of the images the
    annotation file lists (a mistyped or wrong ``data.*_images``): ingested, it would replace an
    earlier ingest with an empty one and training would fail later with "0 training images"."""
    if not records or files is None:
        return
    names = annotated_files(records)
    if any(name.startswith(("../", "/")) or name in files for name in names):
        return  # one is there, or names point out of the folder, which the listing cannot answer
    raise UserInputError(f"{no_images_found(annotations, names, images, files)} Nothing was ingested.")


def describe_changes(previous: dict, annotations_sha256: str, listing: str) -> str:
    """What differs from the earlier ingest's manifest ``previous``, in words."""
    if "images_listing" not in previous:
        return "an ingest by an earlier version, which did not list the images"
    changed = [what for what, key, value in (("the annotation file", "annotations_sha256", annotations_sha256),
                                             ("the image files", "images_listing", listing))
               if previous.get(key) != value]
    if changed:
        return f"an earlier ingest, and {' and '.join(changed)} changed since"
    return "an ingest of another input or shard size"


@dataclass
class IngestInput:
    """What an ingest compares with an earlier one's manifest: the image files as one listing gives
    them (None when listing is refused), their digest, and the fingerprint of the whole input."""

    images: str
    annotations_digest: Any  # the annotation file's ``hashlib.sha256``
    shard_size: int
    files: dict[str, int] | None
    listing: str
    fingerprint: str

    @classmethod
    def read(cls, images: str, annotations_digest: Any, shard_size: int) -> IngestInput:
        files = list_images(images)
        listing = images_listing(files)
        return cls(images, annotations_digest, shard_size, files, listing,
                   fingerprint(annotations_digest, images, listing, shard_size))

    @property
    def annotations_sha256(self) -> str:
        return self.annotations_digest.hexdigest()

    def fingerprint_with(self, listing: str) -> str:
        """The fingerprint of this input had the images been listed as ``listing``."""
        return fingerprint(self.annotations_digest, self.images, listing, self.shard_size)

    def cut_to(self, names: Collection[str]) -> IngestInput:
        """This input with its listing and fingerprint over ``names`` only (the files the annotation
        file names): any other file under the folder changes neither. ``files`` stays whole."""
        if self.files is None:
            return self
        names = set(names)
        listing = images_listing({name: size for name, size in self.files.items() if name in names})
        return replace(self, listing=listing, fingerprint=self.fingerprint_with(listing))

    def as_listed_in(self, output: str, manifest: dict) -> IngestInput:
        """This input listed as the ingest in ``output`` (its ``manifest``) listed its own: over the
        files its annotation file names, when it recorded them; else every file (an ingest by an
        earlier version). Its listing then compares with the manifest's; its fingerprint too when
        the annotation file is the same."""
        names = read_annotated_files(output, manifest.get("annotations_sha256", ""))
        return self if names is None else self.cut_to(names)


def read_annotated_files(output: str, annotations_sha256: str) -> list[str] | None:
    """The files the annotation file of sha256 ``annotations_sha256`` names, as the ingest in
    ``output`` recorded them; None when it recorded none, or those of another annotation file."""
    path = storage.join(output, ANNOTATED_FILES)
    try:
        recorded = json.loads(storage.read_bytes(path))
    except (FileNotFoundError, ValueError):  # none, or cut short
        return None
    if not isinstance(recorded, dict) or recorded.get("annotations_sha256") != annotations_sha256:
        return None
    return recorded["files"]


def write_annotated_files(output: str, annotations_sha256: str, names: Collection[str]) -> None:
    """Record the files an annotation file names beside its ingest in ``output`` (before its manifest)."""
    storage.write_whole(storage.join(output, ANNOTATED_FILES),
                        json.dumps({"annotations_sha256": annotations_sha256, "files": sorted(set(names))}).encode())
