"""The one place that chooses dockpart-proxy's HTTP/1.1 parser.

``httptools`` (C, llhttp) on CPython, where it is the faster; :mod:`dockpart.http11` (the
same interface and rules, in Python) on PyPy, whose JIT compiles it while it would reach
``httptools`` only through its slow C-API emulation.  ``DOCKPART_HTTP_PARSER=http11`` (or
``httptools``) overrides the choice, for tests and benchmarks.
"""

from __future__ import annotations

import os
import platform

_choice = os.environ.get("DOCKPART_HTTP_PARSER") or (
    "httptools" if platform.python_implementation() == "CPython" else "http11")

if _choice == "httptools":
    import httptools
elif _choice == "http11":
    from dockpart import http11 as httptools  # type: ignore[no-redef]  # its interface
else:
    raise ImportError(f"DOCKPART_HTTP_PARSER={_choice!r}: use httptools or http11")
