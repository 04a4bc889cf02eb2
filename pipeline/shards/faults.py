"""The one fault policy every reader applies: a damaged sample is skipped, named and counted once (`BadSamples`);
past the budget the run stops with a message."""

from __future__ import annotations

import math
import warnings


class DataWarning(UserWarning):
    """Data that was skipped (unreadable shard or sample) or a fallback that was taken."""


class TooManyBadSamples(RuntimeError):
    """More damaged samples than the run's budget (`data.max_bad_samples`) allows."""


class BadSamples:
    """The fault policy of every shard reader: skip a damaged shard or sample, name it and count it; stop the run
    (TooManyBadSamples) once the count passes the budget.

    The count is of distinct damaged samples (by sample key; a shard's damage without one by its message), however
    often they are met: every epoch re-reads them, and validation and evaluation read some of them too.
    budget (`data.max_bad_samples`): >= 1 an absolute count, in (0, 1) a fraction of `total` samples (the dataset's),
    0 none at all. Also a webdataset error handler (`handler=policy`): it returns True, i.e. "skip and go on".
    `take()` returns the damaged samples first met since its last call (the datamodule hands them on with each
    batch, so that the count crosses worker processes and ranks).
    """

    def __init__(self, budget: float = 0.01, total: int = 0, name: str = "data.max_bad_samples"):
        if budget < 0:
            raise ValueError(f"{name} must be >= 0 (a count, or a fraction < 1 of the samples), got {budget}")
        self.budget, self.total, self.name = budget, total, name
        self.allowed = budget if math.isinf(budget) else int(budget) if budget >= 1 or budget == 0 else \
            math.floor(budget * total)
        self.seen: dict[str, str] = {}  # each distinct damaged sample: its identity -> the first message naming it
        self._taken = 0
        self.keys: set[str] = set()  # keys of the skipped samples, where known (readers leave them out afterwards)

    @property
    def count(self) -> int:
        """Distinct damaged samples met in this process."""
        return len(self.seen)

    @property
    def records(self) -> list[str]:
        """"<shard>: sample <key>: <reason>" of each distinct damaged sample, in the order they were met."""
        return list(self.seen.values())

    def __call__(self, error: Exception) -> bool:
        self.skip(error)
        return True

    def skip(self, error: Exception, key: str | None = None) -> None:
        """Count `error` (a sample's, by its `key`, else by its message) unless that sample was met before."""
        if key is not None:
            self.keys.add(key)
        identity = key if key is not None else str(error)
        if identity in self.seen:
            return
        self.seen[identity] = str(error)
        warnings.warn(f"skipped ({self.count} distinct damaged sample{'s' if self.count > 1 else ''} so far in this "
                      f"process): {error}", DataWarning, stacklevel=2)
        self.check(self.count)

    def check(self, count: int) -> None:
        """Raise if `count` distinct bad samples (this process's, or a run's over processes) pass the budget."""
        if count > self.allowed:
            of = f" ({self.budget:g} of {self.total} samples)" if 0 < self.budget < 1 else ""
            raise TooManyBadSamples(
                f"{count} distinct damaged sample{'s' if count > 1 else ''}, more than {self.name}={self.allowed}{of} allows; the last: "
                f"{self.records[-1] if self.seen else '(met in other processes)'}. Run `letstalk check` on "
                f"the dataset, repair or re-prepare it, or raise {self.name}")

    def take(self) -> list[str]:
        """Identities of the damaged samples first met since the last call."""
        new = list(self.seen)[self._taken:]
        self._taken = self.count
        return new
