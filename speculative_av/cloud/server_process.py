"""What the package's gRPC server processes share at start-up: flag checks, logging, signals."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType


def positive_int(text: str) -> int:
    """Parse a command-line integer of at least 1 (argparse ``type``)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def start_process(log_level: str, log: logging.Logger) -> threading.Event:
    """Log to stderr at ``log_level``; return an event that SIGTERM and SIGINT set."""
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info('%s received, shutting down', signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop
