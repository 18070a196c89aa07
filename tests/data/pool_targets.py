"""Functions the worker-pool tests run in worker processes (importable by name in a fresh interpreter)."""

from __future__ import annotations

import os
import signal
import time


def echo(x):
    return x


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def fail(message: str):
    raise ValueError(message)


def sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


def segfault():
    os.kill(os.getpid(), signal.SIGSEGV)


def hog(mb: int) -> int:
    return len(bytearray(mb * 2**20))
