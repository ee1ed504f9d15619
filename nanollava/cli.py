"""
What the scripts share about their users: flags checked at parse time, a user's mistake reported as one sentence
(once, by rank 0, under torchrun), and a lock that keeps two runs out of one output directory.

- `Parser` / `checked`: a value out of range is refused before any work, naming the flag (exit 2).
- `UserError` and `one_sentence`: the errors a user can cause (a bad flag value, a missing or malformed file, a
  corrupt checkpoint, a full disk) end in `error: ...` on stderr and a non-zero exit, never a traceback; under
  torchrun only rank 0 prints it (every rank meets the same error), and the others exit as quietly.
- `lock_dir`: fcntl.flock on DIR/.lock, which names its holder (pid and host); the kernel releases it when the
  holder exits or is killed, so a stale lock file never blocks a rerun.
"""
import argparse
import errno
import fcntl
import os
import socket
import sys


class UserError(Exception):
    """A failure the user caused and can fix: its message is the whole report."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the flag, exit 2 (argparse would print the usage block first)
        self.exit(2, f"{self.prog}: error: {message}\n")


def checked(kind, ok, rule):
    """An argparse type: kind(text), refused unless ok(value), with the rule in the message (argparse adds the flag:
    "argument --batch1: must be 1 or more, not 0")."""
    def parse(text):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, not {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def _sentence(e):
    """The message of a user error; one raised in a DataLoader worker arrives wrapped in the worker's traceback,
    whose last line is the original 'module.Class: message'."""
    text = str(e).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        text = f"could not write {e.filename or 'a file'}: the disk is full"
    return text


def one_sentence(main, *args, errors=(), peer_errors=(), rank=None):
    """Runs main(*args); a UserError, one of `errors` (CheckpointError, DataError, ...) or a full disk becomes
    'error: ...' on stderr from rank 0 only, and exit status 1. On the other ranks `peer_errors` (a collective that
    failed because rank 0 left) exit 1 quietly too. Other exceptions are bugs: their traceback stays."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    try:
        return main(*args)
    except (UserError, *errors) as e:
        failure = e
    except peer_errors:
        if rank == 0:
            raise
        sys.exit(1)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        failure = e
    if rank == 0:
        print(f"error: {_sentence(failure)}", file=sys.stderr, flush=True)
    sys.exit(1)


def lock_dir(directory, what):
    """Takes DIR/.lock for this process (held until it exits) or raises a UserError naming the holder."""
    os.makedirs(directory, exist_ok=True)
    f = open(os.path.join(directory, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{directory} is in use by another {what} ({holder}); wait for it to finish or pass another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f  # keep it open: closing the file releases the lock
