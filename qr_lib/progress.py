"""Progress bars: widgets in JupyterLab, plain text when `make reproduce` streams notebooks to a terminal.

A notebook kernel makes tqdm.auto draw an ipywidget, which papermill cannot show in a terminal;
the command line (qr_lib/cli.py) sets PLAIN_ENV so the kernels it starts print text bars instead, at most
one line every PLAIN_INTERVAL seconds so the terminal stays readable.
"""
from __future__ import annotations

import os

from tqdm.auto import tqdm as _auto
from tqdm.std import tqdm as _text

PLAIN_ENV = "QR_LIB_PLAIN_PROGRESS"
PLAIN_INTERVAL = 20.0


def headless() -> bool:
    """Whether the command line runs this kernel (no one can see a widget or move a slider)."""
    return bool(os.environ.get(PLAIN_ENV))


def tqdm(*args, **kwargs):
    if headless():
        kwargs.setdefault("mininterval", PLAIN_INTERVAL)
        kwargs.setdefault("ascii", True)
        return _text(*args, **kwargs)
    return _auto(*args, **kwargs)
