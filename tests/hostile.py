"""Builders of hostile models for the sandbox tests: models whose inference tries to get out.

TorchScript (what the model host loads today) needs no native code to touch the filesystem:
``torch.from_file(path, shared=False, size=n)`` maps (reads) any file the process can open, and
``torch.from_file(path, shared=True, size=n)`` opens it O_RDWR|O_CREAT and maps it MAP_SHARED,
so writing into the tensor creates and writes the file. Both are scriptable.

Sockets and programs need native code. The realistic vector is an AOTInductor package (.pt2):
its model is a shared library that ``torch._inductor.aoti_load_package`` dlopens and calls.
``native_package`` builds one whose generated C++ kernel is replaced, during compilation, by
code that performs an action chosen by its input and returns the errno:

    input  int64[2]: (mode, arg)      mode 0 read READ_PATH, 1 create/write WRITE_PATH,
                                      2 TCP connect to 127.0.0.1:arg, 3 posix_spawn
                                      /usr/bin/touch MARKER_PATH and wait for it
    output int64[2]: (errno or 0, mode)   (-1: unknown mode; 1000+status: the program failed)

Building one takes a C++ compile of the AOTInductor wrapper (about 30-40 s on a 2-core VM):
build it once per test session.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

READ, WRITE, CONNECT, EXEC = 0, 1, 2, 3


class FileReader(torch.nn.Module):
    """forward(path) -> the first bytes of the file at path, read with torch.from_file."""

    def forward(self, path: str, n: int) -> torch.Tensor:
        return torch.from_file(path, shared=False, size=n, dtype=torch.uint8).clone()


class FileWriter(torch.nn.Module):
    """forward(path) -> writes n bytes 'A' into path (created if missing) via a shared mapping."""

    def forward(self, path: str, n: int) -> torch.Tensor:
        t = torch.from_file(path, shared=True, size=n, dtype=torch.uint8)
        t.fill_(65)
        return t.clone()


def torchscript_reader(out: str | os.PathLike) -> str:
    torch.jit.save(torch.jit.script(FileReader()), str(out))
    return str(out)


def torchscript_writer(out: str | os.PathLike) -> str:
    torch.jit.save(torch.jit.script(FileWriter()), str(out))
    return str(out)


_HOSTILE_CPP = r"""
#include <cerrno>
#include <fcntl.h>
#include <unistd.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <arpa/inet.h>
extern char **environ;
static int64_t mlfleet_hostile(int64_t mode, int64_t arg) {
    if (mode == 0) {
        int fd = open(READ_PATH, O_RDONLY | O_CLOEXEC);
        if (fd < 0) return errno;
        char b[16];
        int e = read(fd, b, sizeof b) < 0 ? errno : 0;
        close(fd);
        return e;
    }
    if (mode == 1) {
        int fd = open(WRITE_PATH, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0) return errno;
        int e = write(fd, "pwned\n", 6) < 0 ? errno : 0;
        close(fd);
        return e;
    }
    if (mode == 2) {
        int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s < 0) return errno;
        struct sockaddr_in a = {};
        a.sin_family = AF_INET;
        a.sin_port = htons((uint16_t)arg);
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        int e = connect(s, (struct sockaddr*)&a, sizeof a) < 0 ? errno : 0;
        close(s);
        return e;
    }
    if (mode == 3) {
        pid_t pid;
        char* argv[] = {(char*)"/usr/bin/touch", (char*)MARKER_PATH, nullptr};
        int r = posix_spawn(&pid, argv[0], nullptr, nullptr, argv, environ);
        if (r != 0) return r;
        int st = 0;
        if (waitpid(pid, &st, 0) < 0) return errno;
        return (WIFEXITED(st) && WEXITSTATUS(st) == 0) ? 0 : 1000 + st;
    }
    return -1;
}
"""


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _AddOne(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def native_package(out: str | os.PathLike, *, read_path: str, write_path: str,
                   marker_path: str) -> str:
    """Builds the hostile AOTInductor package at out (a .pt2 path); returns its path."""
    from torch._inductor import aoti_compile_and_package, codecache, config

    prelude = (f"#define READ_PATH {_c_string(read_path)}\n#define WRITE_PATH {_c_string(write_path)}\n"
               f"#define MARKER_PATH {_c_string(marker_path)}\n" + _HOSTILE_CPP)
    original = codecache.AotCodeCompiler.compile.__func__
    patched = []

    def compile_patched(cls, graph, wrapper_code, kernel_code, *args, **kwargs):
        # The kernel of x + 1 becomes: out = (hostile(mode, arg), mode), then return.
        m = re.search(r'extern "C"\s+void\s+\w+\(const int64_t\* in_ptr0,\s*int64_t\* out_ptr0\)\s*\{',
                      kernel_code)
        if m is None:
            raise RuntimeError("hostile: the generated kernel has an unexpected shape")
        head = kernel_code[:m.end()]
        inc = head.find("\n", head.find("#include <torch/csrc/inductor/cpp_prefix.h>")) + 1
        kernel_code = (head[:inc] + prelude + head[inc:]
                       + "\n    out_ptr0[0] = mlfleet_hostile(in_ptr0[0], in_ptr0[1]);"
                         " out_ptr0[1] = in_ptr0[0]; return;\n" + kernel_code[m.end():])
        patched.append(True)
        return original(cls, graph, wrapper_code, kernel_code, *args, **kwargs)

    ep = torch.export.export(_AddOne(), (torch.zeros(2, dtype=torch.int64),))
    codecache.AotCodeCompiler.compile = classmethod(compile_patched)
    try:
        with config.patch({"force_disable_caches": True}):
            path = aoti_compile_and_package(ep, package_path=str(Path(out)))
    finally:
        codecache.AotCodeCompiler.compile = classmethod(original)
    if not patched:
        raise RuntimeError("hostile: AotCodeCompiler.compile was not called; nothing was patched")
    return path


def run_native(package, mode: int, arg: int = 0) -> int:
    """Runs a loaded hostile package (from aoti_load_package) once; returns the errno (0: it worked)."""
    out = package(torch.tensor([mode, arg], dtype=torch.int64))
    if isinstance(out, (list, tuple)):
        out = out[0]
    return int(out[0])


def exported_from_file(out: str | os.PathLike, path: str, *, write: bool) -> str:
    """A torch.export program (.pt2) whose graph maps ``path`` with ``aten.from_file``: reads its
    first byte (write=False) or fills 8 bytes of it with 'A', creating it (write=True). Export
    cannot trace ``from_file`` (no fake kernel): one is registered while exporting, as anyone
    hand-crafting a hostile program could."""

    class FromFile(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = torch.from_file(path, shared=write, size=8 if write else 1, dtype=torch.uint8)
            if write:
                t.fill_(65)
            return x + t[0].to(torch.float32)

    def meta(filename, shared=None, size=0, *, dtype=None, layout=None, device=None, pin_memory=None):
        return torch.empty(size, dtype=dtype or torch.float32, device="meta")

    lib = torch.library.Library("aten", "IMPL")
    try:
        lib.impl("from_file", meta, "Meta")
        ep = torch.export.export(FromFile(), (torch.zeros(1),))
    finally:
        lib._destroy()
    ep.example_inputs = None  # no warm-up input: the deployment starts, requests make the attempt
    torch.export.save(ep, str(out))
    return str(out)
