"""Atomic writes: a file or folder appears under its final name complete, or not at all.

Every writer of a result (embeddings, sidecars, checkpoints, configs, vocab, TSV, JSON) goes
through here. Temporaries sit next to the target (same filesystem, so the rename is atomic), are
named `.NAME.tmp-PID-RANDOM[.EXT]` (the target's extension kept: numpy and paddle add or read it),
and are removed when the write fails. An OSError of the write itself (a full disk: ENOSPC) names
the target, not the temporary that no longer exists; the target is left as it was.
"""
import contextlib
import os
import shutil
import uuid

TMP_MARK = ".tmp-"


def temporary_name(path):
    """A fresh temporary path next to `path`, keeping its extension."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    return os.path.join(folder, f".{stem}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}")


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def _naming_target(error, tmp, path):
    """`error` with the target's name where it had the temporary's or none (ENOSPC from a
    write() has none); errors about other files are left alone."""
    name, target = error.filename, os.fspath(path)
    if error.errno is None:
        return error
    if isinstance(name, str) and name.startswith(tmp + os.sep):  # inside a temporary folder
        target = os.path.join(target, os.path.relpath(name, tmp))
    elif name is not None and name != tmp:
        return error
    return OSError(error.errno, error.strerror, target)  # same errno, same subclass


@contextlib.contextmanager
def _removed_on_error(tmp, path):
    try:
        yield
    except OSError as e:
        _remove(tmp)
        named = _naming_target(e, tmp, path)
        if named is e:
            raise
        raise named from e
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path; when the block ends without error it is renamed to `path`.
    For writers that take a path (paddle.save, np.save, np.savez)."""
    tmp = temporary_name(path)
    with _removed_on_error(tmp, path):
        yield tmp
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_write(path, mode="w", encoding="utf-8", newline=None):
    """open() a temporary file for writing; renamed to `path` when the block ends without error."""
    if "b" in mode:
        encoding, newline = None, None
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding, newline=newline) as f:
            yield f


def write_text(path, text, encoding="utf-8"):
    with atomic_write(path, "w", encoding=encoding, newline="") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield an empty temporary folder; when the block ends without error it replaces `path`
    (a previous folder of that name is removed only then)."""
    tmp = temporary_name(path)
    with _removed_on_error(tmp, path):
        os.makedirs(tmp)
        yield tmp
        if os.path.lexists(path):
            old = temporary_name(path)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
