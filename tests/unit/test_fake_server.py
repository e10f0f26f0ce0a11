"""The test suite's fake OpenAI server never outlives the test that started it (#24 round 3 item 26)."""


def test_a_fake_server_does_not_outlive_the_test_that_started_it(tmp_path):
    """Item 26: a fake OpenAI server was seen running 20 minutes after the suite, its parent gone (a test
    process killed before its fixture could stop it)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil
    from conftest import HERE

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from conftest import Server; s = Server(); print(s.proc.pid, flush=True); time.sleep(600)",
                               HERE], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.path.dirname(HERE)})
    server = psutil.Process(int(holder.stdout.readline()))
    assert server.is_running()
    os.kill(holder.pid, signal.SIGKILL)  # the test process dies without a teardown
    holder.wait()
    deadline = time.time() + 15
    while time.time() < deadline and server.is_running() and server.status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.2)
    alive = server.is_running() and server.status() != psutil.STATUS_ZOMBIE
    if alive:
        server.kill()
    assert not alive, "the fake server outlived the process that started it"
