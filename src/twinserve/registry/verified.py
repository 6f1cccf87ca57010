"""Per-host proof that a version's files were verified, so each host hashes them once.

A full check (`content.verify_folder`) reads every byte: minutes for an 8B model, and an
endpoint starts several replicas of one pinned version at once. After a check passes, a
marker records each file's size, mtime_ns, ctime_ns and inode; the next resolve of the same
version on this host compares those (one `stat` per file) and hashes again only when one
differs, or when the marker is for another folder or another manifest.

What a `stat` can miss, and how that is covered:
- a same-size write in the same timestamp tick as the file's previous write: Linux stamps
  files from a coarse clock (a few ms), some file systems round to 1–2 s. As git does for
  "racily clean" index entries, no marker is written while any file's mtime is within
  `RACY_WINDOW_NS` of the check's start; such a folder is hashed again next time. The
  registry's own downloads are backdated (`settle`) so they qualify at once.
- a copy that keeps the mtime (`cp -p`, `rsync -t`) over the same inode: its ctime changes,
  and ctime can't be set back by a user.
A marker is only a shortcut: missing, unreadable or stale, it costs one full check, never a
wrong answer beyond what these stamps can see.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from twinserve.registry._files import write_atomic
from twinserve.registry.content import ByteCallback, Manifest, verify_folder

log = logging.getLogger(__name__)

# wider than any file system's timestamp granularity (FAT: 2 s), so a later write always shows
RACY_WINDOW_NS = 2_000_000_000


class FileStamp(BaseModel):
    """What `stat` said of one file when its hash matched."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(ge=0, description="Size in bytes.")
    mtime_ns: int = Field(description="Last write (settable by a user: hence ctime too).")
    ctime_ns: int = Field(description="Last inode change: any write, even one that restores mtime.")
    inode: int = Field(ge=0, description="Replacing the file by a rename gives another inode.")


class VerifiedMarker(BaseModel):
    """A passed check of one folder against one manifest, on this host."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    folder: str = Field(description="Absolute path of the folder checked.")
    manifest_sha256: str = Field(description="sha256 of the manifest checked against.")
    checked_ns: int = Field(description="When the check started (ns since the epoch).")
    files: dict[str, FileStamp] = Field(description="Relative path → its stamp after the check.")


def verify_on_host(
    folder: Path, manifest: Manifest, marker: Path, on_bytes: ByteCallback | None = None
) -> bool:
    """Check `folder` against `manifest` unless `marker` shows this host already did.

    True when it hashed the files (and then wrote the marker where it could); ModelLoadError
    naming the first missing or changed file, as `verify_folder` does.
    """
    if still_verified(marker, folder, manifest):
        return False
    started = time.time_ns()
    verify_folder(folder, manifest, on_bytes)
    record_verified(marker, folder, manifest, started)
    return True


def still_verified(marker: Path, folder: Path, manifest: Manifest) -> bool:
    """Whether `marker` is for this folder and manifest and every file's stamp is unchanged."""
    try:
        found = VerifiedMarker.model_validate_json(marker.read_bytes())
    except (OSError, ValidationError):
        return False
    if found.folder != str(folder) or found.manifest_sha256 != _manifest_digest(manifest):
        return False
    if found.files.keys() != manifest.files.keys():
        return False
    return all(_stamp(folder / rel) == stamp for rel, stamp in found.files.items())


def record_verified(marker: Path, folder: Path, manifest: Manifest, checked_ns: int) -> bool:
    """Write the marker of a check that passed (started at `checked_ns`); False when not written.

    Not written while a file is racy (written too close to the check to trust its stamp),
    nor where the cache is read-only: the next resolve then checks again.
    """
    stamps = {rel: _stamp(folder / rel) for rel in manifest.files}
    if any(s is None or s.mtime_ns >= checked_ns - RACY_WINDOW_NS for s in stamps.values()):
        return False
    found = VerifiedMarker(
        folder=str(folder),
        manifest_sha256=_manifest_digest(manifest),
        checked_ns=checked_ns,
        files={rel: s for rel, s in stamps.items() if s is not None},
    )
    try:
        write_atomic(marker, found.model_dump_json())
    except OSError as exc:  # a read-only cache: correct, just slower next time
        log.warning("could not record the verification of %s: %s", folder, exc)
        return False
    return True


def settle(folder: Path) -> None:
    """Backdate the mtimes of a freshly written private folder past the racy window.

    For the registry's own downloads, before they are checked and renamed into place: their
    mtimes mean nothing, and once older than any write to come, a later write always changes
    them, so the first check's marker can be trusted at once (the next replica skips hashing).
    """
    past = time.time_ns() - 2 * RACY_WINDOW_NS
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.utime(path, ns=(path.stat().st_atime_ns, past))


def _stamp(path: Path) -> FileStamp | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return FileStamp(size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns, inode=st.st_ino)


def _manifest_digest(manifest: Manifest) -> str:
    return hashlib.sha256(manifest.model_dump_json().encode()).hexdigest()
