"""The one progress bar every long command uses: tqdm on stderr, with its rate (images/s, tokens/s, ...).

On a terminal it is tqdm's usual bar. When stderr is not a terminal (a Snakemake job writes it into
its log file, pytest captures it) the bar must not fill the log: it prints one plain line (no
carriage returns) at most every `LOG_INTERVAL` seconds, nothing in its first `LOG_INTERVAL`
seconds, and a last summary line only when it finished and ran that long (a quick step stays
silent); a run that fails leaves the error as the log's last line. `VISAE_PROGRESS=0` turns every bar off. Bars never touch stdout, where commands
print what tests and rules parse.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

ENV = "VISAE_PROGRESS"  # "0" turns the bars off
LOG_INTERVAL = 20.0  # seconds between two lines when stderr is not a terminal
TTY_INTERVAL = 0.5  # seconds between two redraws on a terminal
LOG_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
LOG_FORMAT_OPEN = "{desc}: {n_fmt}{unit} [{elapsed}, {rate_fmt}{postfix}]"  # no known total


def enabled_by_env() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class LogBar(tqdm):
    """tqdm for a log file: whole lines, few of them, no monitor thread writing on its own."""

    monitor_interval = 0

    def display(self, msg=None, pos=None):
        line = (self.__str__() if msg is None else msg).strip()
        if line and line != getattr(self, "_last_line", None):
            self._last_line, self._last_n = line, self.n
            self.fp.write(line + "\n")
            self.fp.flush()
        return True

    def close(self):
        if self.disable:
            return
        finished = self.total is None or self.n >= self.total
        long_enough = self._time() - self.start_t >= self.delay
        if finished and long_enough and self.leave is not False and sys.exc_info()[0] is None and \
                getattr(self, "_last_n", None) != self.n:
            self._ema_dt = lambda: None  # the summary's rate: over the whole run
            with self._lock:
                self.display()
        self.disable = True
        self._decr_instances(self)


def progress(iterable=None, *, total=None, desc: str, unit: str, unit_scale: bool = False, initial: int = 0,
             enabled: bool = True, file=None, interval: float | None = None) -> tqdm:
    """A bar over `iterable` or up to `total`, counted in `unit` (plural: "images", "tokens", "steps").

    `enabled=False` (a command's own --quiet) or VISAE_PROGRESS=0 give a bar that does nothing.
    Use it like tqdm: update(n), set_postfix_str(s, refresh=False), close() (in a finally); set
    `leave = False` before closing a bar whose run will end in an error, to leave no summary line."""
    file = sys.stderr if file is None else file
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    common = dict(iterable=iterable, total=total, desc=desc, unit=f" {unit}", unit_scale=unit_scale, initial=initial,
                  file=file, disable=not (enabled and enabled_by_env()))
    if getattr(file, "isatty", lambda: False)():
        return tqdm(**common, mininterval=TTY_INTERVAL, dynamic_ncols=True)
    wait = LOG_INTERVAL if interval is None else interval
    return LogBar(**common, mininterval=wait, maxinterval=max(wait, 1.0), delay=wait, ascii=True,
                  bar_format=LOG_FORMAT if total else LOG_FORMAT_OPEN)


def counted(items, *, total, desc: str, unit: str, size=len, **kw):
    """Yield `items` (batches) with a bar advanced by `size(item)` once each item's work is done."""
    bar = progress(total=total, desc=desc, unit=unit, **kw)
    try:
        for item in items:
            yield item
            bar.update(size(item))
    finally:
        bar.close()
