"""The results file of a sweep (JSONL, one row per finished point, appended and fsync'ed) and its lock."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from lightning.pytorch.utilities import rank_zero_warn

from lightning_delta.sweep.rows import SweepRow

__all__ = ["ResultsFile", "ResultsLock", "ResultsLockedError", "iter_rows"]


class ResultsFile:
    """An append-only JSONL file of sweep rows, each with a ``key``; safe against a crash at any moment.

    Reading tolerates a torn last line (a write cut short); :meth:`repair` cuts it off so that the next append
    starts on a fresh line. A malformed line elsewhere is a corrupt file and raises.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        """Every complete row, in file order (a torn last line is ignored, with a warning)."""
        rows, torn = self._parse()
        if torn is not None:
            rank_zero_warn(f"{self.path}: the last line is incomplete (a write was cut short); it is ignored.")
        return rows

    def rows(self) -> list[SweepRow]:
        """Every complete row as a :class:`SweepRow`.

        Raises:
            ValueError: naming the file and the row that is no sweep row.
        """
        rows = []
        for number, row in enumerate(self.read()):
            try:
                rows.append(SweepRow.from_dict(row))
            except ValueError as error:
                raise ValueError(f"{self.path}, row {number + 1}: {error}") from None
        return rows

    def keys(self) -> set[str]:
        return {row["key"] for row in self.read() if "key" in row}

    def _parse(self) -> tuple[list[dict[str, Any]], int | None]:
        """The rows, and the byte offset where a torn last line starts (``None``: there is none).

        Every row is written with one ``write`` ending in a newline, so a crash can only leave a prefix of the last
        row without its newline: that tail is torn. A line that ended with a newline and is not JSON is corruption.
        """
        if not self.path.exists():
            return [], None
        data = self.path.read_bytes()
        body, _, tail = data.rpartition(b"\n") if b"\n" in data else (b"", b"", data)
        rows = []
        for number, line in enumerate(body.split(b"\n") if body else []):
            if line.strip():
                rows.append(self._row(line, number))
        if tail.strip():
            try:
                rows.append(self._row(tail, len(rows)))
            except ValueError:
                return rows, len(data) - len(tail)
        return rows, None

    def _row(self, line: bytes, number: int) -> dict[str, Any]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.path}, line {number + 1}: not JSON ({error}); the file is corrupt.") from None
        if not isinstance(row, dict):
            raise ValueError(f"{self.path}, line {number + 1}: a row must be a JSON object, got {row!r}.")
        return row

    def repair(self) -> None:
        """Cut off a torn last line, and end a complete last row with a newline if it lacks one."""
        if not self.path.exists():
            return
        _, torn = self._parse()
        with open(self.path, "r+b") as handle:
            if torn is not None:
                handle.truncate(torn)
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())

    def append(self, row: Mapping[str, Any]) -> None:
        """Write ``row`` as one line with a single write, then flush and fsync."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(row, default=str, ensure_ascii=False) + "\n").encode("utf-8")
        with open(self.path, "ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


class ResultsLockedError(RuntimeError):
    """Another sweep holds the lock of this results file."""


class ResultsLock:
    """``<results>.lock`` beside the results file: held by the one process that writes the rows of a sweep.

    It is tried once (no waiting): a second sweep on the same file raises :class:`ResultsLockedError` instead of
    running the points that the first is running. The operating system frees the lock when its process ends, killed
    or not, so a lock file left behind blocks nothing.
    """

    def __init__(self, results: str | os.PathLike) -> None:
        self.results = Path(results)
        self.path = self.results.with_name(self.results.name + ".lock")
        self._lock = FileLock(str(self.path), timeout=0)
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise ResultsLockedError(
                f"Another sweep holds {self.results} (its lock {self.path} is taken). Two sweeps on one results file "
                "would run the same points twice and write duplicate rows. Wait for that sweep to finish (this one "
                "then resumes from its rows), or give this sweep another results file (--sweep.results)."
            ) from None
        self.held = True

    def release(self) -> None:
        if self.held:
            self._lock.release()
            self.held = False


def iter_rows(paths: Iterable[str | os.PathLike] | str | os.PathLike) -> Iterator[SweepRow]:
    """The rows of one or several results files, in order.

    Raises:
        FileNotFoundError: naming every path that is not an existing file, before any row is read.
    """
    files = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(path) for path in paths]
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"No results file at {', '.join(missing)}: check the path, or write it with `lightning-delta sweep` "
            "(its --sweep.results) first."
        )
    return (row for path in files for row in ResultsFile(path).rows())
