"""One atomic file write for every daemon: a reader sees the whole old file or the whole new one."""

import os
import tempfile


def write_atomically(path, data: bytes | str, mode: int = 0o644) -> None:
    """Write ``data`` to a fresh file beside ``path`` and rename it over ``path``.

    The temporary name is unique (``mkstemp``), so two writers never share it; ``mode``
    replaces mkstemp's 0600, which would hide the file from readers run as other users.
    """
    if isinstance(data, str):
        data = data.encode()
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
