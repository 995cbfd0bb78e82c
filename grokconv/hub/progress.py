"""A byte progress bar shared by threads (download and verify)."""
from __future__ import annotations

import threading

from tqdm import tqdm

__all__ = ["Progress"]


class Progress:
    """A byte bar that several threads advance (tqdm's own counter is not thread-safe)."""

    def __init__(self, total: int, desc: str, progress: bool | None, initial: int = 0):
        self.bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=desc,
                        disable=None if progress is None else not progress)
        self.lock = threading.Lock()

    def update(self, n: int) -> None:
        with self.lock:
            self.bar.update(n)

    def note(self, text: str) -> None:
        with self.lock:
            self.bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        self.bar.close()
