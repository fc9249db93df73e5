"""kdm_pipe.background: a function in a spawned process — its value, its exception and its stop come back to the
caller, its output goes to the log, and it never outlives the caller."""

import os
import subprocess
import sys
import textwrap
import time

import pytest
from infra import alive

from kdm_pipe.background import Background
from kdm_pipe.errors import ConfigError, DataError, DiskFull
from kdm_pipe.interrupts import Terminated, stop_on_signals


def talk(x):
    print(f"working on {x}")
    print("a warning", file=sys.stderr)
    return {"x": x, "pid": os.getpid()}


def refuse(error):
    raise error


class Unpicklable(Exception):
    def __init__(self, a, b):               # pickle would call Unpicklable(msg): a missing argument on the way back
        super().__init__(f"{a} and {b}")


def unpicklable():
    raise Unpicklable("this", "that")


def vanish():
    os._exit(3)


def wait_for_a_stop():
    with stop_on_signals():
        time.sleep(60)


def test_value_and_output(tmp_path):
    job = Background(talk, (7,), tmp_path / "job.log")
    value = job.result()
    assert value["x"] == 7 and value["pid"] != os.getpid()
    assert (tmp_path / "job.log").read_text().splitlines() == ["working on 7", "a warning"]


@pytest.mark.parametrize("error", [ConfigError("--batch 9: too big"), DataError("shard-000001.tar: truncated"),
                                   DiskFull("/tmp", 2**30)])
def test_an_exception_comes_back_as_itself(tmp_path, error):
    """As itself, so the caller's exit code is the one the function's failure has (2 for bad input, 1 else)."""
    job = Background(refuse, (error,), tmp_path / "job.log")
    with pytest.raises(type(error)) as raised:
        job.result()
    assert str(raised.value).split(", have")[0] == str(error).split(", have")[0]     # free space moves


def test_an_exception_that_does_not_pickle_comes_back_as_its_line(tmp_path):
    with pytest.raises(Exception, match="this and that"):
        Background(unpicklable, (), tmp_path / "job.log").result()


def test_a_process_that_dies_without_answering(tmp_path):
    with pytest.raises(RuntimeError, match=f"exit code 3 and no answer; its output: {tmp_path / 'job.log'}"):
        Background(vanish, (), tmp_path / "job.log").result()


def test_stop_is_a_sigterm_the_function_sees(tmp_path):
    job = Background(wait_for_a_stop, (), tmp_path / "job.log")
    time.sleep(3)                                    # spawned: the child imports before it installs its handler
    t = time.monotonic()
    job.stop()
    assert time.monotonic() - t < 5 and not job.running()
    with pytest.raises(Terminated) as stopped:
        job.result()
    assert stopped.value.code == 143


def test_it_never_outlives_a_killed_caller(tmp_path):
    """The caller is SIGKILLed (no cleanup runs): the kernel sends the child SIGTERM."""
    caller = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from kdm_pipe.background import Background
        from test_background import wait_for_a_stop
        if __name__ == "__main__":
            job = Background(wait_for_a_stop, (), {str(tmp_path / 'job.log')!r})
            print(job._proc.pid, flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    child = int(caller.stdout.readline())
    time.sleep(3)
    caller.kill()
    caller.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive(child):
        time.sleep(0.1)
    assert not alive(child)
