"""Append-only JSONL outputs keyed by a stable item id: how every long stage resumes.

A stage appends finished items (one JSON object per line, fsynced per batch). After a crash the file
may end in a torn line; :meth:`JsonlShard.open` cuts it off and returns the ids already written, so
the stage skips them. Items are written in input order, so a resumed run ends with the same bytes an
uninterrupted run writes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from hallu.errors import HalluError
from hallu.fileio import set_aside


class JsonlShard:
    def __init__(self, path: str | os.PathLike, key: str = "id"):
        self.path = Path(path)
        self.key = key
        self.set_aside: Path | None = None  # where open(fresh=True) moved an earlier output
        self._f = None

    def open(self, fresh: bool = False) -> list[str]:
        """Prepare for appending; return the ids already written (in file order).

        ``fresh``: what an earlier attempt wrote was made with other options or inputs; it is set aside as
        ``<name>.previous-N.jsonl`` (a new N each time, never over an older one) rather than deleted, so
        a mistyped option never costs a finished rollout, and one line on stderr says where it went.
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HalluError(f"{self.path}: cannot write ({e.strerror or e})") from None
        if fresh and self.path.exists():
            if self.path.stat().st_size:
                self.set_aside = set_aside(self.path)
                print(f"note: {self.path} was made with other options or inputs; kept it as "
                      f"{self.set_aside.name}", file=sys.stderr, flush=True)
            else:
                self.path.unlink()  # an empty file holds nothing to keep
        done: list[str] = []
        if self.path.exists():
            data = self.path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data):  # a torn last line from a killed writer: drop it
                with open(self.path, "r+b") as f:
                    f.truncate(end)
                    f.flush()
                    os.fsync(f.fileno())
                data = data[:end]
            for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
                try:
                    rec = json.loads(line)
                    done.append(str(rec[self.key]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise HalluError(
                        f"{self.path}:{lineno}: corrupt line in a stage output (not a JSON record with "
                        f"'{self.key}'); delete the file to start the stage over"
                    ) from None
        try:
            self._f = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise HalluError(f"{self.path}: cannot write ({e.strerror or e})") from None
        return done

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        try:
            self._f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:  # a full disk, a quota: the rerun resumes from the last whole line
            raise HalluError(f"{self.path}: cannot write ({e.strerror or e}); free space and rerun to resume") from None

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> JsonlShard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
