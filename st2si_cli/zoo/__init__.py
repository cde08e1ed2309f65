"""The zoo: content-addressed artifacts with an SQLite index (`store.py`).

sqlite_utils imports pandas when it is installed, only to map `pandas.Timestamp` values to a column type;
the zoo never stores one, and the import costs about half a second of every command's start. So
sqlite_utils is imported here, before any zoo module needs it, with pandas hidden from it. pandas itself
stays importable for everything else.
"""

from __future__ import annotations

import sys


def _import_sqlite_utils_without_pandas() -> None:
    if "sqlite_utils" in sys.modules or "pandas" in sys.modules:
        return
    sys.modules["pandas"] = None  # type: ignore[assignment]  # `import pandas` raises ImportError
    try:
        import sqlite_utils  # noqa: F401
    finally:
        del sys.modules["pandas"]


_import_sqlite_utils_without_pandas()
