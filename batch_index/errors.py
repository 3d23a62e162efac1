"""One exception root for the whole product, so callers can catch everything we raise on purpose.

Messages name the bad value and what was expected; the CLI prints them without a traceback.
"""

from __future__ import annotations


class EcgSearchError(Exception):
    """Root of every error this project raises deliberately."""


class InvalidInputError(EcgSearchError, ValueError):
    """A signal, query or parameter is not what the index expects (shape, dtype, NaN, k, ...)."""


class UnknownMetricError(InvalidInputError):
    """A metric or mode name that does not exist at all."""


class MetricNotIndexedError(InvalidInputError):
    """A real metric that this particular index was not built for."""


class IndexFormatError(EcgSearchError):
    """An index directory that is missing, corrupt (checksum mismatch) or of an incompatible format."""
