"""Waiting on subprocesses without wall-clock timeouts. A command is stopped only when it hangs:
when for ``quiet_s`` seconds it neither writes output, changes a watched file nor uses CPU (a
deadlock, a wait that never ends), or when its processes have used more than ``cpu_limit_s``
seconds of CPU (an endless loop). Neither measure depends on how busy the machine is, which a
total timeout does: on a shared 2-core machine a one-minute command can take ten.

``FPN_TF_TEST_QUIET_S`` overrides the default quiet limit (seconds)."""

import os
import subprocess
import threading
import time

import psutil

QUIET_S = float(os.environ.get("FPN_TF_TEST_QUIET_S", 300))
# CPU seconds that count as progress: a hung process's idle threads (gRPC polling, TensorFlow's
# thread pools) use a little CPU, far less than this per quiet_s.
CPU_STEP_S = 10.0
CPU_LIMIT_S = 3600.0
POLL_S = 0.5


class Hang(AssertionError):
    """A watched command made no progress for quiet_s seconds or used more than its CPU limit."""


class Progress:
    """Tracks the progress of processes (their CPU time, their children's included) and of files
    (each path, or every file under a directory: size and modification time)."""

    def __init__(self, procs, watch=(), quiet_s=None, cpu_limit_s=None, what="command"):
        self.procs = list(procs)
        self.watch = [str(p) for p in watch]
        self.quiet_s = QUIET_S if quiet_s is None else quiet_s
        self.cpu_limit_s = CPU_LIMIT_S if cpu_limit_s is None else cpu_limit_s
        self.what = what
        self._cpu = {}  # pid -> the largest CPU time seen of that process
        self._files = self._file_state()
        self._cpu_mark = 0.0
        self._last = time.monotonic()
        self.extra = lambda: None  # more state whose change counts as progress (output sizes)
        self._extra = None

    def cpu_seconds(self) -> float:
        for proc in self.procs:
            try:
                root = psutil.Process(proc.pid)
                for p in [root] + root.children(recursive=True):
                    t = p.cpu_times()
                    used = t.user + t.system + t.children_user + t.children_system
                    self._cpu[p.pid] = max(self._cpu.get(p.pid, 0.0), used)
            except psutil.Error:  # exited (its last reading stays counted)
                pass
        return sum(self._cpu.values())

    def _file_state(self):
        state = []
        for path in self.watch:
            if os.path.isdir(path):
                for root, _, names in os.walk(path):
                    for name in names:
                        state.append(_stat(os.path.join(root, name)))
            else:
                state.append(_stat(path))
        return state

    def check(self):
        """Raises Hang if the processes hung; otherwise notes any progress."""
        cpu = self.cpu_seconds()
        if cpu > self.cpu_limit_s:
            raise Hang(f"{self.what} used {cpu:.0f} s of CPU (limit {self.cpu_limit_s:.0f} s)")
        files, extra = self._file_state(), self.extra()
        now = time.monotonic()
        if files != self._files or extra != self._extra or cpu - self._cpu_mark >= CPU_STEP_S:
            self._files, self._extra, self._cpu_mark, self._last = files, extra, cpu, now
        elif now - self._last > self.quiet_s:
            files = f", no change to {self.watch}" if self.watch else ""
            raise Hang(
                f"{self.what} hung: no output{files} and under {CPU_STEP_S:.0f} s of CPU in "
                f"the last {self.quiet_s:.0f} s"
            )


def _stat(path):
    try:
        s = os.stat(path)
        return path, s.st_size, s.st_mtime_ns
    except OSError:
        return path, None, None


def kill_tree(proc):
    """SIGKILL to a process and every process it started."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    for p in children:
        try:
            p.kill()
        except psutil.Error:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def wait_until(predicate, procs, watch=(), quiet_s=None, cpu_limit_s=None, what="command"):
    """Waits until ``predicate()`` holds: True then; False if every process exited first and it
    still does not hold. Raises Hang (after killing the processes) when they hang."""
    progress = Progress(procs, watch, quiet_s, cpu_limit_s, what)
    try:
        while True:
            if predicate():
                return True
            if all(p.poll() is not None for p in procs):
                return predicate()
            progress.check()
            time.sleep(POLL_S)
    except Hang:
        for p in procs:
            kill_tree(p)
        raise


def wait(procs, watch=(), quiet_s=None, cpu_limit_s=None, what="command"):
    """Waits until every process has exited, or one has failed (the others, which may wait on
    it, are then killed); their return codes. Raises Hang as wait_until."""

    def done():
        codes = [p.poll() for p in procs]
        return None not in codes or any(c not in (None, 0) for c in codes)

    wait_until(done, procs, watch, quiet_s, cpu_limit_s, what)
    for p in procs:
        if p.poll() is None:
            kill_tree(p)
    return [p.wait() for p in procs]


def run(args, *, watch=(), quiet_s=None, cpu_limit_s=None, input=None, **popen_kwargs):
    """``subprocess.run(args, capture_output=True, text=True, **popen_kwargs)`` without a
    timeout: the command runs as long as it makes progress (output, a change under ``watch``,
    CPU). A hang raises Hang with the output so far."""
    popen_kwargs.pop("capture_output", None)
    popen_kwargs.pop("text", None)
    proc = subprocess.Popen(
        args,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen_kwargs,
    )
    chunks = {"stdout": [], "stderr": []}

    def read(stream, into):
        for block in iter(lambda: os.read(stream.fileno(), 65536), b""):
            into.append(block)
        stream.close()

    readers = [
        threading.Thread(target=read, args=(proc.stdout, chunks["stdout"]), daemon=True),
        threading.Thread(target=read, args=(proc.stderr, chunks["stderr"]), daemon=True),
    ]
    for r in readers:
        r.start()
    if input is not None:
        proc.stdin.write(input.encode() if isinstance(input, str) else input)
        proc.stdin.close()
    name = " ".join(str(a) for a in (args if isinstance(args, (list, tuple)) else [args]))[:200]
    progress = Progress([proc], watch, quiet_s, cpu_limit_s, what=name)
    progress.extra = lambda: (len(chunks["stdout"]), len(chunks["stderr"]))
    try:
        while proc.poll() is None:
            progress.check()
            time.sleep(POLL_S)
    except Hang as hang:
        kill_tree(proc)
        for r in readers:
            r.join(10)
        raise Hang(
            f"{hang}\n--- stdout ---\n{_text(chunks['stdout'])[-3000:]}\n--- stderr ---\n"
            f"{_text(chunks['stderr'])[-3000:]}"
        ) from None
    for r in readers:
        r.join()
    return subprocess.CompletedProcess(
        args, proc.returncode, _text(chunks["stdout"]), _text(chunks["stderr"])
    )


def _text(chunks):
    return (
        b"".join(chunks).decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    )
