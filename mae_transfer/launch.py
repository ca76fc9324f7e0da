"""Run one of the tools in a subprocess, as the demo and the study runner do: output appended to a log file,
an interrupt (Ctrl-C, SIGTERM) ending the tool cleanly, a failure as one `MaeTransferError` line.

    run_logged([sys.executable, "tools/train_seg.py", ...], work_dir / "run.log", "cell scratch__seg")
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from mae_transfer.errors import MaeTransferError
from mae_transfer.paths import REPO_ROOT

STOP_GRACE_S = 20.0  # after an interrupt, how long a tool may take to stop by itself before it is killed
SELF_STOP_S = 2.0  # how long to wait for a tool that got the terminal's Ctrl-C itself, before passing it on
TAIL_BYTES = 64 * 1024  # the part of a log searched for its last line


def run_logged(cmd: Sequence[str | os.PathLike], log: str | os.PathLike, what: str, *,
               cwd: str | os.PathLike = REPO_ROOT, env: Mapping[str, str] | None = None,
               grace_s: float = STOP_GRACE_S) -> None:
    """Run `cmd` (program first, e.g. `sys.executable`) in `cwd`, stdout and stderr appended to `log` after a
    `# <time> $ <command>` line.

    Interrupts: a terminal's Ctrl-C reaches the tool as well (same process group); SIGINT or SIGTERM sent to
    this process alone is passed on to the tool as SIGINT (a Python tool then unwinds: files closed, temp files
    removed), or as SIGTERM where SIGINT is ignored here (the tool then ignores it too). The tool gets
    `grace_s` to stop, is killed after that or on a second interrupt, and KeyboardInterrupt goes on up. A tool
    that ends by SIGINT / exit 130 on its own raises KeyboardInterrupt too: someone stopped it, so the caller
    stops as well.

    Failure (any other non-zero exit): one line, `MaeTransferError("step failed (exit N): <what>; last line of
    <log>: <this run's last line of output>")`.
    """
    cmd = [os.fspath(c) for c in cmd]
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(cmd)}\n")
        fh.flush()
        start = fh.tell()  # this run's output begins here: an earlier attempt's last line is not its error
        proc = None
        # the tool inherits an ignored SIGINT (a script's `cmd &`): only SIGTERM can ask it to stop then
        stop_signal = signal.SIGTERM if signal.getsignal(signal.SIGINT) == signal.SIG_IGN else signal.SIGINT
        with sigterm_as_interrupt():
            try:
                proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                        env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"})
                code = proc.wait()
            except OSError as err:  # not executable / not found
                raise MaeTransferError(f"{what}: cannot start {cmd[0]}: {err.strerror or err} (log: {log})") from None
            except KeyboardInterrupt:
                if proc is not None:
                    stop_child(proc, grace_s, stop_signal)
                raise
    if code in (130, -signal.SIGINT):
        raise KeyboardInterrupt
    if code != 0:
        how = f"exit {code}" + (f", killed by {_signal_name(-code)}" if code < 0 else "")
        raise MaeTransferError(f"step failed ({how}): {what}; last line of {log}: {last_line(log, start)}")


def stop_child(proc: subprocess.Popen, grace_s: float, stop_signal: int, self_stop_s: float = SELF_STOP_S) -> None:
    """Stop a running tool: wait `self_stop_s` for it to end by itself, then send `stop_signal`, then kill it
    after `grace_s` (or at once on a second interrupt)."""
    try:
        try:
            # a terminal's Ctrl-C (or a signal to the whole group) reached the tool too: it is stopping; a
            # second SIGINT now could cut its clean-up short
            proc.wait(timeout=self_stop_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(stop_signal)
            proc.wait(timeout=grace_s)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):  # stuck, or a second interrupt
        proc.kill()
        proc.wait()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (`kill PID`) raises KeyboardInterrupt like Ctrl-C, so the same clean-up runs
    instead of this process vanishing and leaving its tool running. Main thread only (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        # None: a handler not set from Python, which cannot be put back; the default is the closest
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def last_line(log: str | os.PathLike, start: int = 0) -> str:
    """The last non-empty line of `log` after byte `start` (at most 300 characters), or "no output"."""
    with open(log, "rb") as fh:
        fh.seek(max(start, fh.seek(0, os.SEEK_END) - TAIL_BYTES))
        text = fh.read().decode(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]  # \r too: progress bars
    return lines[-1][:300] if lines else "no output"


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"
