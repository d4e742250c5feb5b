"""The command wrapper: a user's error is one line and exit status 2; a bug keeps its traceback (exit status 1)."""
import errno
import subprocess
import sys

import pytest

from engine.cli import run_command
from engine.core.errors import ShardError, UserError
from models import ModelError


def _fails_with(exc):
    def main(argv):
        raise exc
    return main


@pytest.mark.parametrize("exc", [UserError("--lr: must be > 0"), ShardError("shard a.tar: truncated\nat byte 3"),
                                 ModelError("unknown model 'x'"),
                                 OSError(errno.ENOSPC, "No space left on device", "/full/x.pt")])
def test_user_errors_are_one_line_and_status_2(exc, capsys):
    with pytest.raises(SystemExit) as stop:
        run_command(_fails_with(exc), [])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize("exc", [ValueError("internal: shapes disagree"), KeyError("state_dict"),
                                 OSError(errno.EBADF, "Bad file descriptor")])
def test_bugs_keep_their_traceback(exc):
    with pytest.raises(type(exc)):
        run_command(_fails_with(exc), [])


def test_internal_value_error_in_a_command_prints_its_traceback(tmp_path):
    """An internal ValueError inside engine.train (not a user's mistake) reaches the user as a traceback with exit
    status 1, not as a one-line 'error:' that would hide the bug."""
    script = f"""
import engine.train
def broken(cfg, env):
    raise ValueError("internal: an invariant broke")
engine.train.prepare = broken
engine.train.main(["--logs", "{tmp_path}/logs", "--no-progress"])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" in proc.stderr and proc.stderr.rstrip().endswith("ValueError: internal: an invariant broke")
