"""Progress of the tokenising: a tqdm bar on a terminal, else a log line now and then."""

from __future__ import annotations

import shutil
import sys
import time

from dense_model.data.preprocess.config import MB


class Progress:
    """tqdm bar (documents, tokens, MB/s) on a terminal; else a log line every `interval` seconds.

    The bar advances by input bytes as stored (compressed bytes for compressed files, so that it
    reaches the total); the text tokenised is counted apart, in characters."""

    def __init__(self, total_bytes: int, enabled: bool | None, interval: float, log, shards: int) -> None:
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.docs = self.tokens = self.bytes = self.chars = self.shards_done = 0
        self.shards = shards
        self.log, self.interval = log, interval
        self.start = self.last_log = time.monotonic()
        self.bar = None
        self._enabled, self._total = enabled, total_bytes

    def begin(self) -> None:
        """Show the bar; called once workers are started (tqdm starts a thread, and fork wants none)."""
        if self._enabled and self.bar is None:
            from tqdm import tqdm

            # get_terminal_size falls back to 100 columns where the terminal reports 0 (some ptys).
            width = shutil.get_terminal_size((100, 20)).columns
            self.bar = tqdm(total=self._total, unit="B", unit_scale=True, desc="tokenizing", ncols=width)

    def update(self, docs: int, tokens: int, nbytes: int, chars: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
        self.chars += chars
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(f"docs={self.docs:,} tokens={self.tokens:,}", refresh=False)
        else:
            self.maybe_log()

    def maybe_log(self) -> None:
        now = time.monotonic()
        if self.bar is None and self.log is not None and now - self.last_log >= self.interval:
            self.last_log = now
            secs = max(now - self.start, 1e-9)
            self.log(
                f"progress: {self.shards_done}/{self.shards} shards, {self.bytes / MB:,.1f} of "
                f"{self._total / MB:,.1f} MB of input read ({self.bytes / MB / secs:.2f} MB/s), "
                f"{self.chars / MB:,.1f} M characters tokenised, {self.docs:,} documents, {self.tokens:,} tokens"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
