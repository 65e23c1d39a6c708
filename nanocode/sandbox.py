"""Run a command inside an isolation boundary: Linux namespaces set up by bubblewrap (`bwrap`).

Two users: the evaluator (model-written programs, nanocode/execution.py) and the agent's `bash` tool
(nanocode/tools.py). Both go through `run`, the one place a child process is started, watched and
killed. Inside the sandbox a command gets
  - new user, pid, ipc, uts, cgroup and network namespaces: no network (only its own loopback)
    unless network=True, it sees only its own processes (its own /proc, read-only: no sysctl
    writes), it cannot create further user namespaces, and it has no capabilities (even when
    nanocode runs as root);
  - a root filesystem built from scratch: the system directories (/usr and the /bin, /lib symlinks),
    a short list of harmless /etc files and the Python install nanocode runs on, all read-only; a
    private /tmp (a small tmpfs); the work dir, writable in "workspace-write" mode, read-only in
    "read-only" mode. Nothing else exists in there: not the user's home, not other projects, not
    /root, /etc/shadow or /sys;
  - a scrubbed environment (no API keys or tokens from the caller), stdin /dev/null;
  - rlimits on address space, CPU time, file size and core dumps, and, where a pids cgroup can be
    created (as root on our machines), a cap on the number of processes: RLIMIT_NPROC is not
    enforced for root, so without the cgroup a fork bomb is stopped only by the wall-clock timeout;
  - a wall-clock timeout, after which everything is killed; and when the command ends, however it
    ends, every process it started dies with its pid namespace (and the cgroup is emptied).
Not covered: the kernel itself (no seccomp filter: a kernel bug is an escape), total disk use in the
work dir (each file is capped by RLIMIT_FSIZE, their number is not), total memory across processes
(each process is capped), and CPU share. No GPU inside (no /dev/nvidia*).

Where bubblewrap or user namespaces are missing, commands run with only the old guards (rlimits, a
scratch dir and execution.py's Python guard; for bash rlimits and the session kill) and a loud
warning is printed once.
"""

import contextlib
import functools
import itertools
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

MODES = ("read-only", "workspace-write", "off")
TMP_MB = 256  # size of the private /tmp (a tmpfs: memory)
# /etc entries a shell, Python and common tools need; the rest (shadow, ssh host keys) stays out
ETC = (
    "alternatives bash.bashrc ca-certificates group hosts inputrc ld.so.cache ld.so.conf "
    "ld.so.conf.d localtime mime.types nsswitch.conf passwd profile python3 ssl"
).split()
ETC_NETWORK = ["resolv.conf", "gai.conf", "host.conf"]
# sh -c _JOIN cgroup argv...: joins the cgroup before argv runs (cheaper than a preexec_fn). $$ is
# the shell's pid, which exec keeps: argv itself is in the cgroup, and all it forks inherits it.
_JOIN = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
SYSTEM_DIRS = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]


@dataclass
class CommandResult:
    returncode: int | None  # None when the command was killed by the timeout
    output: str  # stdout and stderr together, at most max_output bytes of it
    timed_out: bool


_lock = threading.Lock()
_available: tuple[bool, str] | None = None  # (usable, what is used or what is missing), probed once
_warned = set()  # the warnings already printed (each is printed once per process)
_counter = itertools.count()


def _bwrap_argv(workdir: str, mode: str, network: bool) -> list[str]:
    """The bwrap command line (up to and including "--") for a command run in `workdir`."""
    # --unshare-all only tries a user namespace; --unshare-user insists on one, which
    # --disable-userns needs: no nested user namespace (a common route to kernel bugs, and full
    # capabilities inside it). --die-with-parent: if nanocode dies, the sandbox dies with it.
    argv = "bwrap --unshare-all --unshare-user --disable-userns --die-with-parent".split()
    # --cap-drop ALL: bwrap started by root would otherwise leave the command every capability in
    # its user namespace (where, mapped to root, they reach root-owned files).
    # --new-session: no controlling terminal, so no TIOCSTI ioctl that types commands into the
    # caller's shell (CVE-2017-5226). A fixed hostname keeps the host's out of outputs.
    argv += ["--new-session", "--cap-drop", "ALL", "--hostname", "sandbox"]
    argv += ["--share-net"] * network
    for d in SYSTEM_DIRS:
        if os.path.islink(d):  # merged /usr: /bin -> usr/bin
            argv += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            argv += ["--ro-bind", d, d]
    for name in ETC + ETC_NETWORK * network:
        if os.path.exists(f"/etc/{name}"):
            argv += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    # The private /tmp first: the binds below may lie under /tmp (a clone and its venv in /tmp/...)
    # and must be mounted on top of it, not hidden by it.
    # --proc: a procfs of the new pid namespace (only the sandbox's processes); --dev: a minimal
    # /dev (null, zero, urandom, tty, ...), no disks or GPUs; --size (bytes) sizes the next --tmpfs.
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(TMP_MB << 20), "--tmpfs", "/tmp"]
    # The Python we run on (a venv and the install it points to may live anywhere, e.g. ~/.pyenv):
    # its real location, and the venv path as it was spelled (python finds its venv by that path).
    binds = {}
    for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix):
        real = os.path.realpath(p)
        if not real.startswith("/usr/"):  # a system Python: already there with /usr
            binds[real] = binds[os.path.abspath(p)] = real
    for dest in sorted(binds, key=len):  # parents first: a later bind inside one stays visible
        argv += ["--ro-bind", binds[dest], dest]
    argv += ["--bind" if mode == "workspace-write" else "--ro-bind", workdir, workdir]
    # a read-only /proc: a command mapped to root could otherwise write the host's sysctls. The
    # root is a tmpfs bwrap made: read-only, nothing can be created beside the binds and /tmp.
    return argv + ["--remount-ro", "/proc", "--remount-ro", "/", "--chdir", workdir, "--"]


def available() -> tuple[bool, str]:
    """(True, what is used) if commands can be sandboxed here, else (False, what is missing).
    Checked once, by starting a trivial sandbox (bwrap present is not enough: user namespaces may
    be disabled)."""
    global _available
    with _lock:
        if _available is None:
            _available = _probe()
        return _available


def _probe() -> tuple[bool, str]:
    """available()'s check: run `true` in a sandbox on a temporary work dir; the reason it failed,
    or which process cap (pids cgroup or RLIMIT_NPROC) the sandbox will have."""
    if shutil.which("bwrap") is None:
        return (
            False,
            "bubblewrap (bwrap) is not installed (Debian/Ubuntu: apt-get install bubblewrap)",
        )
    with tempfile.TemporaryDirectory(prefix="nanocode-probe-") as d:
        argv = _bwrap_argv(os.path.realpath(d), "workspace-write", False) + ["true"]
        try:
            p = subprocess.run(argv, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            return False, f"bubblewrap could not be started ({e})"
    if p.returncode != 0:
        err = (p.stderr.decode(errors="replace").strip().splitlines() or [p.returncode])[-1]
        return False, (
            f"bubblewrap cannot create namespaces here ({err}); unprivileged user namespaces "
            "may be disabled (sysctl kernel.unprivileged_userns_clone)"
        )
    if _cgroup_base():
        return True, "bubblewrap namespaces; a pids cgroup caps processes"
    root = ", which root ignores" if os.geteuid() == 0 else ""
    return True, f"bubblewrap namespaces; no pids cgroup: processes capped by RLIMIT_NPROC{root}"


def isolated(mode: str = "workspace-write") -> bool:
    """Will a command in `mode` run inside the sandbox? (Warns once, loudly, when it cannot.)"""
    if mode not in MODES:
        raise ValueError(f"unknown sandbox mode {mode!r} (choose from {', '.join(MODES)})")
    if mode == "off":
        return False
    ok, reason = available()
    if not ok:
        warn_unavailable(reason)
    return ok


def warn_once(name: str, message: str):
    """Print `message` to stderr between two bars of "!", the first time `name` is warned of."""
    with _lock:
        if name in _warned:
            return
        _warned.add(name)
    bar = "!" * 78
    print(f"{bar}\nWARNING: {message}\n{bar}", file=sys.stderr, flush=True)


def warn_unavailable(reason: str):
    """The loud no-sandbox warning, once per process."""
    warn_once(
        "sandbox",
        f"no sandbox: {reason}.\nCommands and evaluated programs run WITHOUT isolation (only "
        "rlimits and a scratch dir):\nthey can read your files, reach the network and see other "
        "processes.",
    )


# ---- the pids cgroup (a cap on processes that holds for root too) ----


@functools.cache  # first asked by _probe, under _lock
def _cgroup_base() -> str | None:
    """A directory where we can create pids cgroups and move processes into them (the cgroup v1
    `pids` hierarchy, or v2 with the pids controller delegated to us), or None. Found by trying."""
    candidates = []
    for line in _read("/proc/self/cgroup").splitlines():
        # "hierarchy-id:controllers:path", e.g. "5:pids:/user.slice" (v1) or "0::/user.slice" (v2)
        hid, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):  # cgroup v1
            candidates.append(f"/sys/fs/cgroup/pids{path}")
        elif hid == "0":  # cgroup v2: usable if the pids controller is delegated to us
            # mounted at /sys/fs/cgroup (v2 only), or at .../unified (the hybrid layout)
            candidates += [f"/sys/fs/cgroup{path}", f"/sys/fs/cgroup/unified{path}"]
    for base in candidates:
        probe = _make_cgroup(64, base, f"nanocode-probe-{os.getpid()}")
        if probe is None:
            continue
        joined = subprocess.run(["/bin/sh", "-c", _JOIN, probe, "true"], capture_output=True)
        _remove_cgroup(probe)
        if joined.returncode == 0:
            return base
    return None


def _make_cgroup(nproc: int, base: str | None = None, name: str | None = None) -> str | None:
    """Create a cgroup under `base` (default: _cgroup_base()) capped at `nproc` processes; its
    path, or None where it cannot be created or has no pids.max (the caller goes on without)."""
    base = base or _cgroup_base()
    if base is None:
        return None
    path = os.path.join(base, name or f"nanocode-{os.getpid()}-{next(_counter)}")
    try:
        os.mkdir(path)
    except OSError:
        return None
    try:
        with open(f"{path}/pids.max", "w") as f:
            f.write(str(nproc))
        return path
    except OSError:  # no pids controller here
        os.rmdir(path)
        return None


def _cgroup_pids(path: str) -> list[int]:
    return [int(x) for x in _read(f"{path}/cgroup.procs").split()]


def _remove_cgroup(path: str):
    """SIGKILL every process in the cgroup and remove it, retrying while the killed processes are
    not yet reaped; gives up silently after about a second (200 tries)."""
    for _ in range(200):
        for pid in _cgroup_pids(path):
            _kill(pid)
        try:
            os.rmdir(path)
            return
        except OSError:  # still busy: the killed processes have not been reaped yet
            time.sleep(0.005)


# ---- starting, watching and killing ----


def _read(path: str) -> str:
    """The file's text, "" if it cannot be read (a process or cgroup may be gone meanwhile)."""
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _kill(pid: int):
    with contextlib.suppress(OSError):  # gone already, or not ours
        os.kill(pid, signal.SIGKILL)


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is `sid`, read from /proc."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        stat = _read(f"/proc/{entry}/stat")  # "pid (comm) state ppid pgrp session ..."
        # comm is the program's name, free to hold spaces and ")": count fields after the last ")"
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def kill_session(sid: int, rounds: int = 100) -> list[int]:
    """SIGKILL every process in session `sid` until none is left (a forking process may add new
    ones between the scan and the kill, hence the rounds). Returns the pids still alive after all
    rounds."""
    for _ in range(rounds):
        with contextlib.suppress(OSError):  # the session leader's group: most of them at once
            os.killpg(sid, signal.SIGKILL)
        pids = session_members(sid)
        if not pids:
            return []
        for pid in pids:
            _kill(pid)
        time.sleep(0.001)
    return session_members(sid)


def _collect(proc, deadline: float, max_output: int, flood_kills: bool):
    """Read the pipes until EOF, the deadline, or (flood_kills) more than max_output bytes on one.
    Returns ([bytes per pipe], reason or None). When the main process has exited, its session is
    killed so that a leftover grandchild holding the pipes open cannot make us wait for the
    deadline."""
    pipes = [p for p in (proc.stdout, proc.stderr) if p is not None]
    out = [bytearray() for _ in pipes]
    sel = selectors.DefaultSelector()
    for i, p in enumerate(pipes):
        sel.register(p, selectors.EVENT_READ, i)
    reason, exited = None, False
    try:
        while sel.get_map() and not reason:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                reason = "timed out"
                break
            # wake at least every 0.1 s: the deadline and the child's exit are checked between reads
            for key, _ in sel.select(timeout=min(remaining, 0.1)):
                chunk, buf = os.read(key.fd, 65536), out[key.data]
                if not chunk:
                    sel.unregister(key.fileobj)
                elif len(buf) + len(chunk) > max_output and flood_kills:
                    reason = f"failed: output limit exceeded ({max_output} bytes)"
                # without flood_kills, past the cap the pipe is still read and dropped: a child
                # blocked on a full pipe would never exit
                buf += chunk[: max(0, max_output - len(buf))]
            # Has the child exited? Asked without reaping it: until proc.wait(), its pid (= the
            # session id we kill by) cannot be reused by an unrelated process.
            if not exited and os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                exited = True
                kill_session(proc.pid)  # the pipes reach EOF once no leftover child holds them
    finally:
        sel.close()
        for p in pipes:
            p.close()
    return out, reason


def run(
    argv,
    workdir,
    env,
    timeout,
    mode="workspace-write",
    network=False,
    nproc=64,
    rlimits=None,
    max_output=1 << 20,
    merge_stderr=False,
    flood_kills=True,
):
    """Run `argv` in `workdir` (in the sandbox unless mode is "off" or no sandbox is available), in
    a new session, stdin /dev/null, until it ends, `timeout` seconds pass or (flood_kills) a stream
    passes max_output bytes; then kill whatever is left of it (its session and its cgroup).
    rlimits: {"as": bytes, "cpu": s, "fsize": bytes, ...} (prlimit's names), applied to the command
    and everything it starts. Returns (exit status, [bytes of stdout, stderr (unless merged)],
    reason it was stopped or None, pids that could not be killed). A death by signal is -signal, as
    from Popen, also inside the sandbox (where bwrap reports it as 128 + signal)."""
    deadline = time.monotonic() + timeout
    workdir = os.path.realpath(workdir)
    cgroup, prefix, sandboxed = None, [], isolated(mode)
    if sandboxed:
        if workdir == "/":  # bound writable, it would bring the whole host back inside
            raise ValueError("the sandbox's work dir cannot be /")
        cgroup = _make_cgroup(nproc)
        prefix = _bwrap_argv(workdir, mode, network)
        rlimits = dict(rlimits or {}, nproc=nproc)  # the only cap where no pids cgroup is made
    # The chain, outermost first: sh joins the cgroup, prlimit sets the limits, bwrap builds the
    # namespaces; each later step inherits the cgroup and limits.
    if rlimits and not shutil.which("prlimit"):
        limits = ", ".join(rlimits)
        warn_once("prlimit", f"prlimit (util-linux) is not on the PATH: no limits ({limits}).")
    elif rlimits:
        prefix = ["prlimit", *(f"--{k}={v}" for k, v in rlimits.items()), "--", *prefix]
    if cgroup:
        prefix = ["/bin/sh", "-c", _JOIN, cgroup, *prefix]
    try:
        proc = subprocess.Popen(
            prefix + argv,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            start_new_session=True,  # session id = proc.pid: what kill_session kills by
        )
    except BaseException:
        if cgroup:
            _remove_cgroup(cgroup)
        raise
    try:
        out, reason = _collect(proc, deadline, max_output, flood_kills)
    finally:
        leftover = kill_session(proc.pid)
        if cgroup:
            _remove_cgroup(cgroup)
            leftover += _cgroup_pids(cgroup)
        rc = proc.wait()
    return (128 - rc if sandboxed and rc > 128 else rc), out, reason, leftover


# A .pyc is trusted while its source keeps its size and its mtime in whole seconds: an edit of
# the same size within a second (an agent's edit_file, then bash) would run the old code (seen as
# synthetic data that changed between runs of one seed). So none is written.
NO_BYTECODE = {"PYTHONDONTWRITEBYTECODE": "1"}


def sandbox_env(home: str = "/tmp") -> dict:
    """The environment inside: nothing of the caller's (API keys, tokens); a PATH that finds our
    Python; one thread per numeric library (many samples run at once)."""
    path = f"{os.path.dirname(os.path.abspath(sys.executable))}:/usr/local/bin:/usr/bin:/bin"
    env = {"PATH": path, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    threads = dict.fromkeys(["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"], "1")
    # TERM=dumb: programs that look at it write no colours or cursor escapes for the model to read
    return env | threads | NO_BYTECODE | {"TERM": "dumb"}


def run_command(
    command: str,
    workdir,
    timeout: float,
    mode: str = "workspace-write",
    network: bool = False,
    memory_mb: int = 8192,
    max_output: int = 1 << 20,
    fsize_mb: int = 1024,
    nproc: int = 256,
) -> CommandResult:
    """Run `command` with `bash -c` in `workdir`, sandboxed per `mode` ("read-only": nothing
    writable but a private /tmp; "workspace-write": the work dir is writable too; "off": no sandbox,
    the caller's environment, as a plain subprocess). network: allow the network. Output beyond
    max_output bytes is dropped (the command keeps running). Every process the command started is
    gone when this returns."""
    off = mode == "off"
    # per process: address space and file size in bytes, CPU in seconds (above the wall clock, so
    # a one-thread busy loop is stopped by the timeout and reported as one)
    limits = {"as": memory_mb << 20, "fsize": fsize_mb << 20, "core": 0, "cpu": int(timeout) + 1}
    rc, (out,), reason, _ = run(
        ["bash", "-c", command],
        workdir,
        os.environ | NO_BYTECODE if off else sandbox_env(),
        timeout,
        mode,
        network,
        nproc,
        None if off else limits,
        max_output,
        merge_stderr=True,
        flood_kills=False,
    )
    timed_out = reason == "timed out"
    return CommandResult(None if timed_out else rc, out.decode(errors="replace"), timed_out)
