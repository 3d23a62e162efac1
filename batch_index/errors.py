"""One exception root for the whole product, so callers can catch everything we raise on purpose.

Messages name the bad value and what was expected; both command lines (``python -m batch_index`` and
``python -m streaming``) print any of them, raised where they run or carried back from a Spark executor
(:func:`ours`), as one ``error: ...`` line without a traceback. Their exit codes are each CLI's documented
one (batch: 2, as for a usage error; streaming: 1). The service's own subclasses live in
``streaming/errors.py``, the wire format's in ``schemas``.
"""

from __future__ import annotations

import re

# how a Python exception reads in the text Spark wraps it in (PythonException, Py4JJavaError):
# the traceback's last line, ``package.module.ClassName: message`` or ``ClassName: message``
_WRAPPED = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*): (.+)$", re.MULTILINE)


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


def _ours_by_name() -> dict[str, type[EcgSearchError]]:
    found: dict[str, type[EcgSearchError]] = {}
    todo: list[type[EcgSearchError]] = [EcgSearchError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.__name__, cls)
        todo.extend(cls.__subclasses__())
    return found


def ours(exc: BaseException) -> EcgSearchError | None:
    """The error of ours behind ``exc``, if any: itself, one it was raised from, or one that Spark carried
    back from an executor as text (which keeps the class name and message, not the object).

    Lets a command line show a deliberate error raised inside a Spark task as the same one clean line it
    shows for one raised in the driver, without listing the classes that can travel.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, EcgSearchError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    by_name = _ours_by_name()
    for name, message in reversed(_WRAPPED.findall(str(exc))):
        if name in by_name:
            return by_name[name](message.strip())
    return None
