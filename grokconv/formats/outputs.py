"""Guarded outputs: every writer records what made its output, resumes only its own work, one run at a time.

A writer opens its output with :func:`guard_output` (one call: lock + fingerprint check), asks
:meth:`OutputGuard.is_complete` before skipping a file, tells :meth:`OutputGuard.done` after a file is
durably in place, and :meth:`OutputGuard.finish` at the end::

    fp = make_fingerprint("to-safetensors", src, layout="hf", quantize="int8", ...)
    with guard_output(dst, fp, owned=("model-*.safetensors", "config.json"), overwrite=overwrite) as g:
        for f in files:
            if g.is_complete(dst / f, lambda p: header_matches(p)):
                continue
            with atomic_write(dst / f, durable=lambda n: g.done(dst / f, n)) as fh:
                fh.write(...)         # fsync, journal line, rename, fsync dir
        g.finish()

State lives in ``DIR/.grokconv/`` (``DIR`` is the output directory, or the directory of a file output
such as ``model.gguf``; ``key`` names the output there):

- ``KEY.json``: the fingerprint (written durably before any output file) and, once finished, the
  finished files and their sizes. Deterministic: a resumed run leaves the same bytes as a fresh one.
- ``KEY.journal``: one line per file made durable during an unfinished run, appended (and fsync'd)
  after the file's bytes are fsync'd and before its rename. A file under its final name but not in the
  journal (a power loss that kept the rename and lost the data) is not trusted, whatever its size and
  header say.
- ``KEY.lock``: the holder's pid and host. A second run stops naming it; a dead holder's lock is taken over.

A fingerprint is the writer's name, the source (per file: name, size, and the sha256 of its first and
last MiB plus its size, or the download manifest's full sha256) and the options that change bytes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OutputLockedError, OutputMismatchError
from .atomic import TMP_SUFFIX, atomic_write_text, fsync_dir, temp_owner

__all__ = ["Fingerprint", "source_fingerprint", "make_fingerprint", "OutputGuard", "guard_output", "STATE_DIR",
           "EDGE_BYTES", "file_digest"]

STATE_DIR = ".grokconv"
EDGE_BYTES = 1 << 20          # the head and the tail of each source file enter its digest
_MANIFEST = f"{STATE_DIR}/manifest.json"   # a grokconv download's manifest: its sha256 are used when present


def file_digest(path: Path, size: int | None = None) -> str:
    """sha256 of (size, the first and the last MiB): cheap, and it changes with any re-draw, re-download
    or re-quantization (every file grokconv reads carries its values in both ends)."""
    size = path.stat().st_size if size is None else size
    h = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        h.update(f.read(min(size, EDGE_BYTES)))
        if size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, size - EDGE_BYTES))
            h.update(f.read(EDGE_BYTES))
    return "edge:" + h.hexdigest()


def _manifest_sha(root: Path) -> dict:
    """{path: (size, sha256)} from a grokconv download manifest in ``root`` (unreadable ones are ignored:
    the source is then fingerprinted from its bytes)."""
    try:
        m = json.loads((root / _MANIFEST).read_text())
        return {e["path"]: (e["size"], e["sha256"]) for e in m["files"]
                if isinstance(e.get("sha256"), str) and isinstance(e.get("size"), int)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _source_files(src: Path) -> list[tuple[str, Path]]:
    if src.is_file():
        return [(src.name, src)]
    out = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))   # .grokconv, .cache (hub state)
        for fn in sorted(filenames):
            if fn.startswith(".") or fn.endswith((TMP_SUFFIX, ".lock")):
                continue
            p = Path(dirpath) / fn
            out.append((p.relative_to(src).as_posix(), p))
    return out


def source_fingerprint(src) -> list[list]:
    """``[[name, size, digest], ...]`` for every file of ``src`` (a file, or a directory without its
    hidden entries and temporary files), names relative to it, sorted."""
    src = Path(src)
    known = _manifest_sha(src) if src.is_dir() else {}
    rows = []
    for name, p in _source_files(src):
        size = p.stat().st_size
        m = known.get(name)
        rows.append([name, size, "sha256:" + m[1] if m and m[0] == size else file_digest(p, size)])
    return sorted(rows)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Fingerprint:
    """What made an output: the writer, the source files and the options that change its bytes."""
    writer: str
    source: tuple = ()                       # ((name, size, digest), ...)
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"writer": self.writer, "source": [list(r) for r in self.source], "options": self.options}

    @classmethod
    def from_dict(cls, d: dict) -> "Fingerprint":
        if not (isinstance(d, dict) and isinstance(d.get("writer"), str) and isinstance(d.get("source"), list)
                and isinstance(d.get("options"), dict)
                and all(isinstance(r, list) and len(r) == 3 for r in d["source"])):
            raise ValueError("not a fingerprint")
        return cls(d["writer"], tuple(tuple(r) for r in d["source"]), d["options"])

    @property
    def source_digest(self) -> str:
        return _digest([list(r) for r in self.source])

    @property
    def digest(self) -> str:
        """16 hex digits naming writer, source and options together."""
        return _digest(self.to_dict())

    def metadata(self) -> dict[str, str]:
        """String key/values for inside an output (safetensors ``__metadata__``, GGUF key/values)."""
        return {"grokconv.fingerprint": self.digest, "grokconv.source": self.source_digest,
                "grokconv.options": json.dumps(self.options, sort_keys=True, separators=(",", ":"))}

    def differences(self, old: "Fingerprint") -> list[str]:
        """What differs from ``old``, in words: the writer, each option, each source file."""
        out = []
        if old.writer != self.writer:
            out.append(f"written by {old.writer}, this run is {self.writer}")
        for k in sorted(set(old.options) | set(self.options)):
            if old.options.get(k) != self.options.get(k):
                out.append(f"{k} was {old.options.get(k)!r}, now {self.options.get(k)!r}")
        before = {r[0]: r for r in old.source}
        now = {r[0]: r for r in self.source}
        changed = [n for n in sorted(set(before) & set(now)) if before[n] != now[n]]
        gone, new = sorted(set(before) - set(now)), sorted(set(now) - set(before))
        for label, names in (("source file changed", changed), ("source file gone", gone),
                             ("new source file", new)):
            if names:
                more = f" and {len(names) - 2} more" if len(names) > 2 else ""
                out.append(f"{label}: {', '.join(names[:2])}{more}")
        return out


def make_fingerprint(writer: str, src=None, **options) -> Fingerprint:
    """The fingerprint of a run of ``writer`` from ``src`` (None: no source, e.g. synth) with ``options``
    (JSON values; paths become their file digest, so a tokenizer given by path counts by its bytes)."""
    opts = {}
    for k, v in sorted(options.items()):
        if isinstance(v, Path):
            v = [v.name, v.stat().st_size, file_digest(v)] if v.is_file() else str(v)
        elif isinstance(v, tuple):
            v = list(v)
        opts[k] = v
    json.dumps(opts)   # options must be JSON values (a TypeError here is a programming error)
    rows = tuple(tuple(r) for r in source_fingerprint(src)) if src is not None else ()
    return Fingerprint(writer, rows, opts)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputGuard:
    """One guarded output: see the module's docstring. Use :func:`guard_output`."""

    def __init__(self, directory, fingerprint: Fingerprint, *, key: str = "output", owned=(),
                 overwrite: bool = False, label=None):
        self.dir = Path(directory)
        self.fp = fingerprint
        self.key = key
        self.owned = tuple(owned)
        self.overwrite = overwrite
        self.label = str(label or self.dir)      # the output as the user named it (error messages)
        state = self.dir / STATE_DIR
        self.record_path = state / f"{key}.json"
        self.journal_path = state / f"{key}.journal"
        self.lock_path = state / f"{key}.lock"
        self._locked = False
        self._finished = False
        self._created = False      # this run wrote the record (and may remove it if it finishes nothing)
        self._done: dict[str, int] = {}
        self.resumed = False       # an unfinished run of this fingerprint was found

    # -- start ------------------------------------------------------------------------------------
    def start(self) -> "OutputGuard":
        (self.dir / STATE_DIR).mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._remove_dead_temps()
            self._check_or_reset()
        except BaseException:
            self.close()
            raise
        return self

    def _lock(self) -> None:
        me = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(3):
            try:
                fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue                         # released meanwhile
                pid, host = holder
                if host == socket.gethostname() and not _pid_alive(pid):
                    # a dead run's lock: take it over (replace it with ours, then make sure ours won)
                    tmp = self.lock_path.with_name(f"{self.lock_path.name}.{os.getpid()}{TMP_SUFFIX}")
                    tmp.write_text(me)
                    os.replace(tmp, self.lock_path)
                    if self._holder() == (os.getpid(), socket.gethostname()):
                        self._locked = True
                        return
                    continue
                raise OutputLockedError(
                    f"another grokconv run (pid {pid} on {host}) is writing this output", path=self.label,
                    hint=f"wait for it to finish; if no such process runs, remove {self.lock_path}")
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self._locked = True
            return
        raise OutputLockedError("could not take the output's lock", path=self.label)

    def _holder(self):
        try:
            pid, host = self.lock_path.read_text().split()
            return int(pid), host
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return (-1, socket.gethostname())     # unreadable: treated as a dead holder's

    def _remove_dead_temps(self) -> None:
        """Temporary files of runs that died (their pid is gone); a live run's are never touched."""
        for p in self.dir.rglob(f"*{TMP_SUFFIX}"):
            pid = temp_owner(p)
            if pid is None or (pid != os.getpid() and not _pid_alive(pid)):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def _owned_files(self) -> list[Path]:
        found = []
        for pat in self.owned:
            found += [p for p in self.dir.glob(pat) if p.is_file() and not p.name.endswith(TMP_SUFFIX)]
        return sorted(set(found))

    def _read_record(self):
        try:
            rec = json.loads(self.record_path.read_text())
            return Fingerprint.from_dict(rec["fingerprint"]), rec
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError, KeyError, TypeError):
            return "unreadable", None

    def _check_or_reset(self) -> None:
        old, rec = self._read_record()
        existing = self._owned_files()
        if old is None:
            problem = [f"it holds {len(existing)} file(s) ({existing[0].relative_to(self.dir)}...) that no "
                       "recorded grokconv run made"] if existing else []
        elif old == "unreadable":
            problem = [f"its record {self.record_path} is unreadable"]
        elif old != self.fp:
            problem = self.fp.differences(old) or ["it was made by another run"]
        else:
            problem = []
        if problem and not self.overwrite:
            raise OutputMismatchError(
                "already holds another output: " + "; ".join(problem), path=self.label,
                hint="pass --overwrite to replace it, or choose another output")
        if problem or self.overwrite:
            for p in existing:
                p.unlink()
            self.journal_path.unlink(missing_ok=True)
            self.record_path.unlink(missing_ok=True)
            rec = None
        if rec is not None:
            files = rec.get("files") if isinstance(rec.get("files"), dict) else {}
            self._done = {k: v for k, v in files.items() if isinstance(k, str) and type(v) is int}
            self._done.update(self._read_journal())
            self.resumed = True
        else:
            atomic_write_text(self.record_path, self._record_text(complete=False))
            self._created = True

    def _record_text(self, complete: bool) -> str:
        rec = {"grokconv_output": 1, "fingerprint": self.fp.to_dict(), "digest": self.fp.digest,
               "complete": complete, "files": dict(sorted(self._done.items())) if complete else {}}
        return json.dumps(rec, indent=1, sort_keys=True) + "\n"

    def _read_journal(self) -> dict[str, int]:
        out = {}
        try:
            lines = self.journal_path.read_text().splitlines()
        except FileNotFoundError:
            return out
        for line in lines:
            try:
                e = json.loads(line)
            except ValueError:
                continue                              # a line cut by a power loss
            if isinstance(e, dict) and e.get("fingerprint") == self.fp.digest and isinstance(e.get("file"), str) \
                    and type(e.get("size")) is int:
                out[e["file"]] = e["size"]
        return out

    def _journal_line(self, name: str, size: int) -> str:
        return json.dumps({"file": name, "size": size, "fingerprint": self.fp.digest}, sort_keys=True) + "\n"

    # -- during the run ---------------------------------------------------------------------------
    def _name(self, path) -> str:
        return Path(path).resolve().relative_to(self.dir.resolve()).as_posix()

    def is_complete(self, path, check=None) -> bool:
        """``path`` was made durable by a run of this fingerprint, still has its size, and ``check(path)``
        (the writer's own test, e.g. its planned header) holds."""
        path = Path(path)
        size = self._done.get(self._name(path))
        if size is None or not path.is_file() or path.stat().st_size != size:
            return False
        return check is None or bool(check(path))

    def done(self, path, size: int) -> None:
        """Record that ``path`` is finished with ``size`` bytes. Call it when its bytes are fsync'd under
        the temporary name and before the rename (``write_planned(before_rename=...)``,
        ``atomic_write(durable=...)``): a file under its final name but absent from the journal is then
        never trusted, and one in the journal had its bytes on disk before its name."""
        name = self._name(path)
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, self._journal_line(name, size).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self._done[name] = size

    def finish(self) -> None:
        """The output is whole: the record lists every finished file; the journal goes."""
        atomic_write_text(self.record_path, self._record_text(complete=True))
        self._finished = True
        self.journal_path.unlink(missing_ok=True)
        fsync_dir(self.record_path.parent)

    def close(self) -> None:
        """Release the lock. A run that ends (or fails) before any file was finished leaves no state."""
        if self._locked and self._created and not self._finished and not self._done:
            self.journal_path.unlink(missing_ok=True)
            self.record_path.unlink(missing_ok=True)
        if self._locked:
            self._locked = False
            if self._holder() == (os.getpid(), socket.gethostname()):
                self.lock_path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def guard_output(directory, fingerprint: Fingerprint, *, key: str = "output", owned=(), overwrite: bool = False,
                 label=None) -> OutputGuard:
    """Lock the output in ``directory`` and check what it holds against ``fingerprint``; a context manager.

    ``owned``: globs (relative to ``directory``) of the files this writer makes; with ``overwrite``, or
    when nothing records them, they are what is removed. Raises :class:`OutputLockedError` when another
    live run holds the output, :class:`OutputMismatchError` when it holds another run's output (naming
    what differs) and ``overwrite`` is not set."""
    return OutputGuard(directory, fingerprint, key=key, owned=owned, overwrite=overwrite, label=label).start()
