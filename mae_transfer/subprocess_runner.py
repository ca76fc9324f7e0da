"""The one subprocess runner of the project (`run_process`): a tool or worker started with a time limit, an
environment and a log file; the demo, the study runner, the cluster jobs and the harnesses (benchmark, GPU
acceptance) all start their processes through it. `run_logged` is its strict form for a training step: output
appended to a log file, an interrupt (Ctrl-C, SIGTERM) ending the tool cleanly, a failure as one
`MaeTransferError` line.

    run_logged([sys.executable, "tools/train_seg.py", ...], work_dir / "run.log", "cell scratch__seg")
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mae_transfer.errors import MaeTransferError
from mae_transfer.paths import REPO_ROOT

STOP_GRACE_S = 20.0  # after an interrupt, how long a tool may take to stop by itself before it is killed
SELF_STOP_S = 2.0  # how long to wait for a tool that got the terminal's Ctrl-C itself, before passing it on
TAIL_BYTES = 64 * 1024  # the part of a log searched for its last line


@dataclass(frozen=True)
class Finished:
    """How a process started by `run_process` ended."""

    code: int | None  # exit status (negative: killed by that signal); None: it ran past its timeout and was killed
    log: Path | None  # where its output went (None: this process's own stdout / stderr)
    start: int = 0  # byte offset in `log` where this run's output begins (after its command line)

    def output(self) -> str:
        """This run's output, as appended to `log`."""
        if self.log is None:
            return ""
        with open(self.log, "rb") as fh:
            fh.seek(self.start)
            return fh.read().decode(errors="replace")


def run_process(cmd: Sequence[str | os.PathLike], *, log: str | os.PathLike | None = None, title: str = "",
                cwd: str | os.PathLike = REPO_ROOT, env: Mapping[str, str] | None = None,
                timeout: float | None = None, new_session: bool = False, ignore_signals: Sequence[int] = (),
                stop_signal: int = signal.SIGINT, grace_s: float = STOP_GRACE_S,
                self_stop_s: float = SELF_STOP_S) -> Finished:
    """Run `cmd` (program first, e.g. `sys.executable`) in `cwd` with `env` (default: this environment) and
    PYTHONUNBUFFERED=1, and wait for it.

    log: stdout and stderr appended to this file after a `# <time> [title] $ <command>` line (None: they go
        where this process's go).
    timeout: seconds; past it the process is killed (with `new_session`, its whole session: the workers it
        started too) and `Finished.code` is None.
    new_session: start it in a session of its own (a terminal's Ctrl-C then reaches this process only).
    ignore_signals: signals the process starts with ignored (a submitit task's USR2 is the task's, not the tool's).
    If this process is interrupted (or any exception reaches it) while waiting, the process gets `self_stop_s` to
    end by itself, then `stop_signal`, then is killed after `grace_s` (`stop_child`); the exception goes on up.
    A program that cannot be started raises OSError.
    """
    cmd = [os.fspath(c) for c in cmd]
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    ignored = tuple(ignore_signals)
    preexec = (lambda: [signal.signal(sig, signal.SIG_IGN) for sig in ignored]) if ignored else None
    fh = None
    start = 0
    if log is not None:
        log = Path(log)
        log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log, "a")
        fh.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')}{' ' + title if title else ''} $ {shlex.join(cmd)}\n")
        fh.flush()
        start = fh.tell()  # this run's output begins here: an earlier attempt's last line is not its error
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT if fh else None,
                                start_new_session=new_session, preexec_fn=preexec)
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if new_session:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole session: workers it started too
            else:
                proc.kill()
            proc.wait()
            code = None
        except BaseException:
            stop_child(proc, grace_s, stop_signal, self_stop_s)
            raise
    finally:
        if fh is not None:
            fh.close()
    return Finished(code, log, start)


def run_logged(cmd: Sequence[str | os.PathLike], log: str | os.PathLike, what: str, *,
               cwd: str | os.PathLike = REPO_ROOT, env: Mapping[str, str] | None = None,
               grace_s: float = STOP_GRACE_S) -> None:
    """Run `cmd` (`run_process`) in `cwd`, stdout and stderr appended to `log` after a `# <time> $ <command>` line.

    Interrupts: a terminal's Ctrl-C reaches the tool as well (same process group); SIGINT or SIGTERM sent to
    this process alone is passed on to the tool as SIGINT (a Python tool then unwinds: files closed, temp files
    removed), or as SIGTERM where SIGINT is ignored here (the tool then ignores it too). The tool gets
    `grace_s` to stop, is killed after that or on a second interrupt, and KeyboardInterrupt goes on up. A tool
    that ends by SIGINT / exit 130 on its own raises KeyboardInterrupt too: someone stopped it, so the caller
    stops as well.

    Failure (any other non-zero exit): one line, `MaeTransferError("step failed (exit N): <what>: <the tool's
    error> (log: <log>)")` with the message of this run's last `error: ...` line (a tool's own one-line error), or,
    when it printed none, `"step failed (exit N): <what>; last line of <log>: <this run's last line of output>"`.
    """
    cmd = [os.fspath(c) for c in cmd]
    log = Path(log)
    # the tool inherits an ignored SIGINT (a script's `cmd &`): only SIGTERM can ask it to stop then
    stop_signal = signal.SIGTERM if signal.getsignal(signal.SIGINT) == signal.SIG_IGN else signal.SIGINT
    with sigterm_as_interrupt():
        try:
            done = run_process(cmd, log=log, cwd=cwd, env=env, stop_signal=stop_signal, grace_s=grace_s)
        except OSError as err:  # not executable / not found
            raise MaeTransferError(f"{what}: cannot start {cmd[0]}: {err.strerror or err} (log: {log})") from None
    code = done.code
    if code in (130, -signal.SIGINT):
        raise KeyboardInterrupt
    if code != 0:
        how = f"exit {code}" + (f", killed by {_signal_name(-code)}" if code < 0 else "")
        error = error_line(log, done.start)
        if error is not None:
            raise MaeTransferError(f"step failed ({how}): {what}: {error} (log: {log})")
        raise MaeTransferError(f"step failed ({how}): {what}; last line of {log}: {last_line(log, done.start)}")


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


def _tail_lines(log: str | os.PathLike, start: int = 0) -> list[str]:
    """The non-empty lines of `log` after byte `start` (its last `TAIL_BYTES` at most), stripped."""
    with open(log, "rb") as fh:
        fh.seek(max(start, fh.seek(0, os.SEEK_END) - TAIL_BYTES))
        text = fh.read().decode(errors="replace")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]  # \r too: progress bars


def last_line(log: str | os.PathLike, start: int = 0) -> str:
    """The last non-empty line of `log` after byte `start` (at most 300 characters), or "no output"."""
    lines = _tail_lines(log, start)
    return lines[-1][:300] if lines else "no output"


def error_line(log: str | os.PathLike, start: int = 0) -> str | None:
    """The message of the last `error: ...` line of `log` after byte `start` (what `cli.run_cli` prints for a user
    error; at most 300 characters), or None: the line that says why a tool failed, wherever later output put it."""
    try:
        lines = _tail_lines(log, start)
    except FileNotFoundError:
        return None
    errors = [ln for ln in lines if ln.startswith("error: ")]
    return errors[-1][len("error: "):][:300] if errors else None


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"
