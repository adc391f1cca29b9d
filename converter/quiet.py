"""Keeping third-party tools' console output out of the converter's own.

litert-torch prints a progress tree to stdout, ai-edge-quantizer prints size summaries and tqdm
bars, absl and TensorFlow Lite log from C++ straight to file descriptors 1 and 2, coremltools
prints pass progress: none of it belongs between the CLI's progress bar and its one-line errors.
:func:`native_output_to` points both descriptors (and Python's ``sys.stdout``/``sys.stderr``) at a
log file for the duration of a call, and the log's last lines can be quoted in an error.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def native_output_to(log_path: Path) -> Iterator[None]:
    """Send fd 1 and fd 2 (C++ and Python writes alike) to ``log_path`` while the block runs."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    with log_path.open("ab") as log:
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            sink = io.TextIOWrapper(os.fdopen(os.dup(log.fileno()), "wb"), write_through=True)
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield
            sink.close()
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def log_tail(log_path: Path, lines: int = 3) -> str:
    """The last non-empty lines of a tool's log, joined: enough to say why it failed."""
    try:
        text = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return " | ".join([line.strip() for line in text if line.strip()][-lines:])[-500:]
