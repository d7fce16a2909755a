"""Scan a Triton-layout repository on disk. Pure reads: no loading, no parsing of configs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_FILENAME = "config.pbtxt"


@dataclass(frozen=True)
class ModelDir:
    """One `<repo>/<model>/` directory and its numeric version folders (ascending)."""

    name: str
    path: Path
    versions: tuple[int, ...]

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILENAME

    def version_dir(self, version: int) -> Path:
        return self.path / str(version)


def is_version_name(name: str) -> bool:
    """Triton takes only decimal folder names without a leading zero as versions."""
    return name.isdigit() and not name.startswith("0") and name.isascii()


def scan_model_dir(path: Path) -> ModelDir:
    versions = sorted(int(p.name) for p in path.iterdir() if p.is_dir() and is_version_name(p.name))
    return ModelDir(name=path.name, path=path, versions=tuple(versions))


def scan_repository(repository: Path) -> list[ModelDir]:
    """Every model directory in `repository` (hidden entries skipped), sorted by name."""
    if not repository.is_dir():
        raise FileNotFoundError(f"model repository '{repository}' is not a directory")
    models = [
        scan_model_dir(p) for p in sorted(repository.iterdir()) if p.is_dir() and not p.name.startswith(".")
    ]
    return models
