"""A sandbox for processes that run uploaded models: Landlock (the filesystem, TCP) and a seccomp
system-call filter, installed with ctypes only (raw syscalls through libc's syscall(), prctl and
a hand-built classic-BPF program): nothing to install.

    probe()  -> what the kernel offers; no side effects
    apply(read_paths=[...], read_write_paths=[...]) -> SandboxReport (what was installed)
    default_read_paths() -> what a Python process with torch loaded needs to keep importing

Once applied, a process and every thread or child it creates afterwards:
- opens files only beneath read_paths (read) and read_write_paths (read, write, create, remove);
  everything else fails with PermissionError (EACCES). Directory traversal, stat() and file
  descriptors opened before are not affected (Landlock restricts opening, not looking).
- cannot bind or connect TCP (Landlock ABI >= 4, EACCES), connect to abstract unix sockets of
  other domains or signal processes outside its domain (ABI >= 6);
- cannot create sockets other than AF_UNIX (none at all with allow_unix_sockets=False), execve,
  ptrace, mount, load modules, use bpf/perf/keyrings/io_uring/userfaultfd, or enter or create
  namespaces: those system calls fail with EPERM (seccomp, deny not kill: the process survives).
  Everything else is allowed so torch, numpy and zmq keep working.
Both are inherited across fork and cannot be lifted (PR_SET_NO_NEW_PRIVS is set too).

Threads. The seccomp filter is installed with SECCOMP_FILTER_FLAG_TSYNC: every thread of the
process gets it. landlock_restrict_self() confines only the calling thread (threads it creates
later inherit it; kernels before a Landlock TSYNC flag offer no way to confine the others), and an
unconfined thread sharing the address space defeats it, so apply() refuses (SandboxError) when
the process has more than one thread, unless allow_threads=True. Landlock ABI >= 8 (Linux 7.0)
has LANDLOCK_RESTRICT_SELF_TSYNC, used when present (not testable on this ABI 7 kernel). Note
that `import torch` (numpy's OpenBLAS) starts a thread unless OPENBLAS_NUM_THREADS=1; a
zmq.Context starts I/O threads; a forked child has a single thread. Hence the call sites:
- the model host applies the sandbox at the top of main(), before `import torch` and before
  loading the model (so code run while loading, such as an AOTInductor .so's constructors, is
  confined too), reading beneath default_read_paths() + the model file (+ the tokenizer);
- an allocation worker inherits it across fork; it may apply a second, narrower layer right
  after fork, before torch.set_num_threads and before creating its zmq.Context.
A worker's connect to its agent (a pathname AF_UNIX socket) is not a Landlock-handled access on ABI
<= 7 (only creating the socket file, MAKE_SOCK, is): its directory needs no rule.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os
import platform
import stat
import struct
import sys
from dataclasses import dataclass, field

# x86_64 system call numbers
NR = {
    "socket": 41, "socketpair": 53, "clone": 56, "execve": 59, "ptrace": 101, "syslog": 103,
    "uselib": 134, "pivot_root": 155, "adjtimex": 159, "chroot": 161, "acct": 163,
    "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168,
    "reboot": 169, "sethostname": 170, "setdomainname": 171, "iopl": 172, "ioperm": 173,
    "init_module": 175, "delete_module": 176, "quotactl": 179, "clock_settime": 227,
    "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272,
    "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311,
    "finit_module": 313, "seccomp": 317, "kexec_file_load": 320, "bpf": 321, "execveat": 322,
    "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "clone3": 435, "mount_setattr": 442, "landlock_create_ruleset": 444,
    "landlock_add_rule": 445, "landlock_restrict_self": 446,
    # a file's metadata: Landlock governs opening, writing, truncating and removing, not these
    "chmod": 90, "fchmod": 91, "chown": 92, "fchown": 93, "lchown": 94, "utime": 132,
    "utimes": 235, "fchownat": 260, "futimesat": 261, "fchmodat": 268, "utimensat": 280,
    "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197,
    "lremovexattr": 198, "fremovexattr": 199, "fchmodat2": 452, "setxattrat": 463,
    "removexattrat": 466,
}

# Denied outright with EPERM.
DENIED_SYSCALLS = (
    "execve", "execveat", "uselib", "ptrace", "process_vm_readv", "process_vm_writev",
    "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr", "init_module", "finit_module", "delete_module",
    "kexec_load", "kexec_file_load", "bpf", "perf_event_open", "keyctl", "add_key",
    "request_key", "unshare", "setns", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "name_to_handle_at", "open_by_handle_at", "reboot", "swapon",
    "swapoff", "acct", "quotactl", "iopl", "ioperm", "syslog", "settimeofday", "clock_settime",
    "adjtimex", "clock_adjtime", "sethostname", "setdomainname",
    # Changing a file's mode, owner, times or extended attributes: model code could otherwise make
    # the agent's key readable to all, or its run directory or model cache unusable (mode 000),
    # for every deployment on the node, on any file the agent's user owns.
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat",
    "utime", "utimes", "futimesat", "utimensat", "setxattr", "lsetxattr", "fsetxattr",
    "removexattr", "lremovexattr", "fremovexattr", "setxattrat", "removexattrat",
)

# Landlock (include/uapi/linux/landlock.h)
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1
FS = {
    "execute": 1 << 0, "write_file": 1 << 1, "read_file": 1 << 2, "read_dir": 1 << 3,
    "remove_dir": 1 << 4, "remove_file": 1 << 5, "make_char": 1 << 6, "make_dir": 1 << 7,
    "make_reg": 1 << 8, "make_sock": 1 << 9, "make_fifo": 1 << 10, "make_block": 1 << 11,
    "make_sym": 1 << 12, "refer": 1 << 13, "truncate": 1 << 14, "ioctl_dev": 1 << 15,
}
FS_ABI1 = (1 << 13) - 1
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
RESTRICT_SELF_TSYNC = 1 << 3  # ABI >= 8 (Linux 7.0): every thread of the process; untested here (ABI 7)
# Rights that make sense on a file (a rule on a non-directory may hold only these).
FILE_RIGHTS = FS["execute"] | FS["write_file"] | FS["read_file"] | FS["truncate"] | FS["ioctl_dev"]
READ_RIGHTS = FS["read_file"] | FS["read_dir"]

# seccomp / BPF
PR_SET_NO_NEW_PRIVS, PR_GET_NO_NEW_PRIVS, PR_GET_SECCOMP = 38, 39, 21
SECCOMP_SET_MODE_FILTER, SECCOMP_GET_ACTION_AVAIL = 1, 2
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_JSET_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
OFF_NR, OFF_ARCH, OFF_ARG0 = 0, 4, 16  # struct seccomp_data; args[0]'s low 32 bits (little-endian)
AF_UNIX = 1
CLONE_NEW_ANY = (0x00000080 | 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000
                 | 0x20000000 | 0x40000000)  # CLONE_NEWTIME, NS, CGROUP, UTS, IPC, USER, PID, NET


class SandboxError(RuntimeError):
    """The sandbox could not be installed (a system call failed, the process has threads...)."""


class SandboxUnavailable(SandboxError):
    """The kernel lacks a layer of the sandbox (Landlock or seccomp filters)."""

    def __init__(self, missing: list[str], probe: dict) -> None:
        super().__init__(f"the kernel lacks {' and '.join(missing)}: {probe}")
        self.missing = missing
        self.probe = probe


@dataclass
class SandboxReport:
    landlock_abi: int | None = None
    fs_handled: int = 0
    read_paths: list[str] = field(default_factory=list)
    read_write_paths: list[str] = field(default_factory=list)
    skipped_paths: list[str] = field(default_factory=list)  # did not exist
    tcp_denied: bool = False  # Landlock ABI >= 4
    scoped: list[str] = field(default_factory=list)  # Landlock ABI >= 6
    seccomp: bool = False
    unix_sockets: bool = True
    denied_syscalls: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    threads: int = 1

    def summary(self) -> str:
        parts = []
        if self.landlock_abi:
            parts.append(f"landlock ABI {self.landlock_abi}: read {len(self.read_paths)} paths, "
                         f"read-write {self.read_write_paths or 'none'}"
                         + (", TCP bind/connect denied" if self.tcp_denied else "")
                         + (f", scoped {'+'.join(self.scoped)}" if self.scoped else ""))
        if self.seccomp:
            parts.append(f"seccomp: {len(self.denied_syscalls)} syscalls denied, sockets: "
                         + ("AF_UNIX only" if self.unix_sockets else "none"))
        if self.missing:
            parts.append(f"MISSING: {', '.join(self.missing)}")
        return "; ".join(parts) or "nothing applied"


_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.syscall.restype = ctypes.c_long
        _libc.prctl.restype = ctypes.c_int
        _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                                ctypes.c_ulong]
    return _libc


def _syscall(name: str, *args) -> int:
    """Returns the result; raises OSError with the errno on -1."""
    conv = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    r = _lib().syscall(ctypes.c_long(NR[name]), *conv)
    if r == -1:
        e = ctypes.get_errno()
        raise OSError(e, f"{name}: {os.strerror(e)}")
    return r


def _prctl(option: int, arg2: int = 0) -> int:
    r = _lib().prctl(option, arg2, 0, 0, 0)
    if r == -1:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl({option}): {os.strerror(e)}")
    return r


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _supported_arch() -> bool:
    return sys.platform == "linux" and platform.machine() == "x86_64" and struct.calcsize("P") == 8


def landlock_abi() -> int | None:
    """The Landlock ABI version, or None (not built in, disabled at boot, not Linux x86_64)."""
    if not _supported_arch():
        return None
    try:
        return _syscall("landlock_create_ruleset", None, ctypes.c_size_t(0),
                        LANDLOCK_CREATE_RULESET_VERSION)
    except OSError:
        return None


def _status() -> dict:
    """This process's seccomp mode and no_new_privs, by prctl (/proc/self is closed once sandboxed)."""
    out = {}
    for key, option in (("Seccomp", PR_GET_SECCOMP), ("NoNewPrivs", PR_GET_NO_NEW_PRIVS)):
        try:
            out[key] = _prctl(option)
        except OSError:
            pass
    return out


def probe() -> dict:
    """What the kernel offers and what this process already has; installs nothing."""
    seccomp_filter = False
    if _supported_arch():
        action = ctypes.c_uint32(SECCOMP_RET_ERRNO)
        try:
            _syscall("seccomp", SECCOMP_GET_ACTION_AVAIL, 0, ctypes.byref(action))
            seccomp_filter = True
        except OSError:
            pass
    st = _status()
    return {
        "arch": platform.machine(),
        "landlock_abi": landlock_abi(),
        "seccomp_filter": seccomp_filter,
        "seccomp_mode": st.get("Seccomp"),  # 0 none, 2 filtered (this process)
        "no_new_privs": bool(st.get("NoNewPrivs")),
        "threads": _thread_count(),
    }


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def _fs_handled(abi: int) -> int:
    handled = FS_ABI1
    if abi >= 2:
        handled |= FS["refer"]
    if abi >= 3:
        handled |= FS["truncate"]
    if abi >= 5:
        handled |= FS["ioctl_dev"]
    return handled


def default_read_paths() -> list[str]:
    """What a Python process with torch imported (or about to be) needs to read to keep working:
    the Python installation, sys.path (not the current directory), the folders of the packages
    imported so far (mlfleet.* in an editable install), the directories of the shared
    libraries it has loaded, the system's libraries, the dynamic loader's cache, time zones,
    /proc/cpuinfo and the CPU topology (torch's cpuinfo reads them at import), /dev/null and
    /dev/urandom. Never /etc as a whole, /home, /root, the agent's files, nor /proc/self: a rule
    on /proc/self names /proc/<this pid>, which a forked worker does not match but can read
    (another process's environ and maps)."""
    paths: list[str] = []
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        paths.append(p)
    cwd = os.getcwd()
    for p in sys.path:
        if p and os.path.abspath(p) != cwd and os.path.isdir(p):
            paths.append(os.path.abspath(p))
    for mod in list(sys.modules.values()):  # packages imported so far (editable installs map
        pkg_path = getattr(mod, "__path__", None)  # mlfleet.* to folders off sys.path)
        if isinstance(pkg_path, list) or type(pkg_path).__name__ == "_NamespacePath":
            for p in list(pkg_path):
                if isinstance(p, str) and os.path.isdir(p) and os.path.abspath(p) != cwd:
                    paths.append(os.path.abspath(p))
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                cols = line.split(None, 5)
                if len(cols) == 6 and cols[5].startswith("/") and ".so" in cols[5]:
                    paths.append(os.path.dirname(cols[5].strip()))
    except OSError:
        pass
    paths += ["/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib", "/etc/ld.so.cache",
              "/etc/localtime", "/usr/share/zoneinfo", "/proc/cpuinfo", "/sys/devices/system/cpu",
              "/dev/null", "/dev/urandom"]
    seen, out = set(), []
    for p in paths:
        real = os.path.realpath(p)
        if real not in seen:
            seen.add(real)
            out.append(real)
    return [p for p in out if not any(p.startswith(q.rstrip("/") + "/") for q in out if q != p)]


def _landlock(read_paths, read_write_paths, abi: int, report: SandboxReport) -> None:
    handled = _fs_handled(abi)
    attr = _RulesetAttr(handled_access_fs=handled)
    size = 8
    if abi >= 4:
        attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP  # no rule: none allowed
        size = 16
        report.tcp_denied = True
    if abi >= 6:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        size = 24
        report.scoped = ["abstract_unix_socket", "signal"]
    try:
        rfd = _syscall("landlock_create_ruleset", ctypes.byref(attr), ctypes.c_size_t(size), 0)
    except OSError as e:
        raise SandboxError(f"landlock_create_ruleset: {e}") from None
    try:
        rw = handled & ~FS["execute"]
        for paths, rights, listed in ((read_paths, READ_RIGHTS, report.read_paths),
                                      (read_write_paths, rw, report.read_write_paths)):
            for p in paths:
                try:
                    fd = os.open(p, os.O_PATH | os.O_CLOEXEC)
                except FileNotFoundError:
                    report.skipped_paths.append(p)
                    continue
                except OSError as e:
                    raise SandboxError(f"cannot open {p} for a Landlock rule: {e}") from None
                try:
                    allowed = rights if stat.S_ISDIR(os.fstat(fd).st_mode) else rights & FILE_RIGHTS
                    rule = _PathBeneathAttr(allowed_access=allowed, parent_fd=fd)
                    _syscall("landlock_add_rule", rfd, LANDLOCK_RULE_PATH_BENEATH,
                             ctypes.byref(rule), 0)
                except OSError as e:
                    raise SandboxError(f"landlock_add_rule {p}: {e}") from None
                finally:
                    os.close(fd)
                listed.append(p)
        try:
            _syscall("landlock_restrict_self", rfd, RESTRICT_SELF_TSYNC if abi >= 8 else 0)
        except OSError as e:
            raise SandboxError(f"landlock_restrict_self: {e}") from None
    finally:
        os.close(rfd)
    report.landlock_abi = abi
    report.fs_handled = handled


def seccomp_program(allow_unix_sockets: bool = True) -> list[tuple[int, int, int, int]]:
    """The classic-BPF filter as (code, jt, jf, k) tuples (exposed for tests and inspection)."""
    deny = SECCOMP_RET_ERRNO | _errno.EPERM
    enosys = SECCOMP_RET_ERRNO | _errno.ENOSYS
    prog: list = []  # entries: (code, jt, jf, k) where jt/jf may be label names

    def ins(code, k, jt=0, jf=0):
        prog.append([code, jt, jf, k])

    ins(BPF_LD_W_ABS, OFF_ARCH)
    ins(BPF_JEQ_K, AUDIT_ARCH_X86_64, 0, "deny")  # i386 (int 0x80) and anything else
    ins(BPF_LD_W_ABS, OFF_NR)
    ins(BPF_JGE_K, X32_SYSCALL_BIT, "deny", 0)  # the x32 ABI
    for name in DENIED_SYSCALLS:
        ins(BPF_JEQ_K, NR[name], "deny", 0)
    # clone3: its flags are in memory, not inspectable; libc falls back to clone
    ins(BPF_JEQ_K, NR["clone3"], "enosys", 0)
    ins(BPF_JEQ_K, NR["socket"], "sock", 0)
    ins(BPF_JEQ_K, NR["socketpair"], "sock", 0)
    ins(BPF_JEQ_K, NR["clone"], "clone", 0)
    ins(BPF_RET_K, SECCOMP_RET_ALLOW)
    labels = {"sock": len(prog)}
    ins(BPF_LD_W_ABS, OFF_ARG0)  # domain (an int: the kernel ignores the upper 32 bits)
    if allow_unix_sockets:
        ins(BPF_JEQ_K, AF_UNIX, "allow", "deny")
    else:
        ins(BPF_RET_K, deny)
    labels["clone"] = len(prog)
    ins(BPF_LD_W_ABS, OFF_ARG0)  # flags: no new namespaces
    ins(BPF_JSET_K, CLONE_NEW_ANY, "deny", "allow")
    labels["allow"] = len(prog)
    ins(BPF_RET_K, SECCOMP_RET_ALLOW)
    labels["deny"] = len(prog)
    ins(BPF_RET_K, deny)
    labels["enosys"] = len(prog)
    ins(BPF_RET_K, enosys)
    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        if isinstance(jt, str):
            jt = labels[jt] - i - 1
        if isinstance(jf, str):
            jf = labels[jf] - i - 1
        if not (0 <= jt < 256 and 0 <= jf < 256):
            raise AssertionError("seccomp program: jump out of range")
        out.append((code, jt, jf, k))
    return out


def _seccomp(allow_unix_sockets: bool, report: SandboxReport) -> None:
    insns = seccomp_program(allow_unix_sockets)
    arr = (_SockFilter * len(insns))(*[_SockFilter(*t) for t in insns])
    fprog = _SockFprog(len(insns), ctypes.cast(arr, ctypes.POINTER(_SockFilter)))
    try:
        r = _syscall("seccomp", SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, ctypes.byref(fprog))
    except OSError as e:
        raise SandboxError(f"seccomp(SET_MODE_FILTER, TSYNC): {e}") from None
    if r != 0:  # the id of a thread that could not be synchronized
        raise SandboxError(f"seccomp TSYNC failed on thread {r}")
    report.seccomp = True
    report.unix_sockets = allow_unix_sockets
    report.denied_syscalls = list(DENIED_SYSCALLS) + ["clone3 (ENOSYS)", "clone with CLONE_NEW*",
                                                      "socket/socketpair other than AF_UNIX"]


def apply(*, read_paths: list[str], read_write_paths: list[str] = (),
          allow_unix_sockets: bool = True, require_all: bool = True,
          allow_threads: bool = False) -> SandboxReport:
    """Confines this process (and its future threads and children) for good.

    read_paths: files and directories beneath which files may be read (and directories listed);
    read_write_paths: beneath which files may also be written, created, truncated and removed.
    Paths that do not exist are skipped (listed in the report). Nothing may be executed.
    require_all: if the kernel lacks Landlock or seccomp filters, raise SandboxUnavailable before
    installing anything; otherwise install what there is and list the rest in report.missing.
    allow_threads: apply Landlock even if other threads exist (they stay unconfined by it)."""
    info = probe()
    missing = []
    if not info["landlock_abi"]:
        missing.append("Landlock")
    if not info["seccomp_filter"]:
        missing.append("seccomp filters")
    if missing and require_all:
        raise SandboxUnavailable(missing, info)
    report = SandboxReport(missing=missing, threads=info["threads"])
    if info["landlock_abi"] and info["landlock_abi"] < 8 and info["threads"] > 1 and not allow_threads:
        raise SandboxError(
            f"this process has {info['threads']} threads; Landlock would confine only the calling "
            "one: apply the sandbox before starting threads (set OPENBLAS_NUM_THREADS=1 before "
            "importing numpy/torch; create zmq contexts afterwards) or in a freshly forked child")
    try:
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
    except OSError as e:
        raise SandboxError(f"prctl(PR_SET_NO_NEW_PRIVS): {e}") from None
    if info["landlock_abi"]:
        _landlock([os.path.abspath(p) for p in read_paths],
                  [os.path.abspath(p) for p in read_write_paths], info["landlock_abi"], report)
    if info["seccomp_filter"]:
        _seccomp(allow_unix_sockets, report)
    return report
