"""Exceptions with messages that name the record and file at fault."""

from __future__ import annotations


class JFEError(Exception):
    """Base class for every error JFE raises on purpose."""


class DataError(JFEError, ValueError):
    """Bad input data: a malformed line, a wrong modality, a missing or corrupt image."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 record_id: str | None = None) -> None:
        self.path, self.line, self.record_id = path, line, record_id
        self.message = message  # the bare message, without the location prefix
        where = []
        if path is not None:
            where.append(f"{path}" + (f":{line}" if line is not None else ""))
        if record_id is not None:
            where.append(f"record {record_id!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class AssetError(JFEError, RuntimeError):
    """An offline asset is missing, cannot be fetched, or fails its checksum."""


class ConfigError(JFEError, ValueError):
    """A configuration file or a model name is invalid."""
