"""The one subprocess runner (mae_transfer/subprocess_runner.py) on its own, with tiny stand-in tools: log file,
failures as one line, interrupts (SIGINT / SIGTERM to the caller only, a tool that ignores SIGINT) ending the tool."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mae_transfer.errors import MaeTransferError
from mae_transfer.subprocess_runner import run_logged
from tests.conftest import REPO_ROOT, default_sigint


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_output_is_appended_and_a_failure_is_one_line_with_this_runs_last_line(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "tool.log"
    handler = signal.getsignal(signal.SIGTERM)
    run_logged(_py("print('first run'); print('env', __import__('os').environ['PYTHONUNBUFFERED'])"), log, "one")
    assert signal.getsignal(signal.SIGTERM) == handler  # put back after the run
    with pytest.raises(MaeTransferError) as err:
        run_logged(_py("import sys; print('working'); print('bad value\\r', file=sys.stderr); sys.exit(3)"), log,
                   "step two")
    assert str(err.value) == f"step failed (exit 3): step two; last line of {log}: bad value"
    with pytest.raises(MaeTransferError) as err:  # silent: the earlier runs' lines are not its error
        run_logged(_py("raise SystemExit(4)"), log, "step three")
    assert str(err.value).startswith("step failed (exit 4): step three;") and str(err.value).endswith(": no output")
    text = log.read_text()
    assert text.count(f"$ {sys.executable} -c ") == 3  # each run starts with its command line
    assert "first run\nenv 1\n" in text and "working\nbad value" in text


def test_a_failure_carries_the_tools_last_error_line_not_later_output(tmp_path: Path) -> None:
    """A tool's one-line `error: ...` (cli.run_cli) is what the failure says, even with output after it (a
    warning at shutdown); an earlier run's error line is not this run's."""
    log = tmp_path / "tool.log"
    tool = """
        import sys
        print("error: an earlier message", file=sys.stderr)
        print("error: config key 'save_epochs' must be a list of positive integers, got 'abc'", file=sys.stderr)
        print("[W] some shutdown warning")
        sys.exit(2)
    """
    with pytest.raises(MaeTransferError) as err:
        run_logged(_py(tool), log, "cell a")
    assert str(err.value) == ("step failed (exit 2): cell a: config key 'save_epochs' must be a list of positive "
                              f"integers, got 'abc' (log: {log})")
    with pytest.raises(MaeTransferError) as err:
        run_logged(_py("print('no error line'); raise SystemExit(1)"), log, "cell b")
    assert str(err.value) == f"step failed (exit 1): cell b; last line of {log}: no error line"


def test_killed_tool_exit_130_and_missing_program(tmp_path: Path) -> None:
    log = tmp_path / "tool.log"
    with pytest.raises(MaeTransferError, match=r"^step failed \(exit -9, killed by SIGKILL\): killed;"):
        run_logged(_py("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"), log, "killed")
    with pytest.raises(KeyboardInterrupt):  # the tool was interrupted on its own: the caller stops too
        run_logged(_py("raise SystemExit(130)"), log, "interrupted")
    with pytest.raises(MaeTransferError, match=r"^missing: cannot start .*no_such_program"):
        run_logged([str(tmp_path / "no_such_program")], log, "missing")


CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    if sys.argv[2] == "ignore":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: (print("child stopped by SIGTERM", flush=True), sys.exit(143)))
    Path(sys.argv[1]).write_text(str(os.getpid()))
    print("child started", flush=True)
    try:
        time.sleep(60)
    except KeyboardInterrupt:
        print("child stopped by SIGINT", flush=True)
        sys.exit(130)
""")
DRIVER = textwrap.dedent("""
    import signal, sys
    sys.path.insert(0, sys.argv[1])
    if sys.argv[4] == "inherit-ignored-sigint":
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for a script's `cmd &`; the tool inherits it
    from mae_transfer.cli import run_cli
    from mae_transfer.subprocess_runner import run_logged
    child, pid_file, mode, log = sys.argv[2:6]
    sys.exit(run_cli(lambda argv: run_logged([sys.executable, child, pid_file, mode], log, "child", grace_s=0.5)))
""")


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" not in status.read_text()
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("stop, mode, ends", [(signal.SIGTERM, "plain", "SIGINT"), (signal.SIGINT, "ignore", None),
                                              (signal.SIGTERM, "inherit-ignored-sigint", "SIGTERM")],
                         ids=["sigterm-to-caller", "sigint-tool-ignores-it", "caller-ignores-sigint"])
def test_interrupt_of_the_caller_alone_ends_the_tool(tmp_path: Path, stop: signal.Signals, mode: str,
                                                      ends: str | None) -> None:
    """The caller is signalled, not the tool (not a terminal's Ctrl-C): the tool gets SIGINT (SIGTERM when it
    inherited an ignored SIGINT), and one that does not stop is killed after grace_s; the caller ends as on
    Ctrl-C."""
    (tmp_path / "child.py").write_text(CHILD)
    (tmp_path / "driver.py").write_text(DRIVER)
    pid_file, log = tmp_path / "child.pid", tmp_path / "child.log"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(REPO_ROOT), str(tmp_path / "child.py"),
                             str(pid_file), mode, str(log)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=default_sigint)
    deadline = time.time() + 60
    while not (pid_file.is_file() and pid_file.read_text() and "child started" in log.read_text()):
        assert time.time() < deadline and proc.poll() is None, "the child never started"
        time.sleep(0.05)
    child = int(pid_file.read_text())
    os.kill(proc.pid, stop)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr.strip() == "interrupted", stderr  # run_cli's Ctrl-C ending
    assert not _alive(child)
    stopped = [sig for sig in ("SIGINT", "SIGTERM") if f"child stopped by {sig}" in log.read_text()]
    assert stopped == ([ends] if ends else [])  # None: killed
