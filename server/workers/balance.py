"""Spread new connections over the frontends in turn, not by the kernel's hash.

Why: with SO_REUSEPORT the kernel picks a frontend for each new connection by a hash of its
addresses and ports, and nothing balances afterwards. One client opening a few connections
often lands them unevenly: perf_analyzer's 3 connections at concurrency 16 went all to one
of two frontends in one run out of two, and its 11 at concurrency 64 split up to 62/38
(docs/ARCHITECTURE.md). The busiest frontend then bounds the server, and on many cores the
spread of a hash over N frontends is worse still.

How: Linux lets a reuseport group carry a BPF program that returns the index of the
listening socket for each new connection (SO_ATTACH_REUSEPORT_EBPF). This one keeps a
counter in a one-entry array map and returns `counter++ % N`: connections go to the
frontends in turn, whoever opens them. The owner loads the program once (`load`) and each
frontend attaches it to its own listening sockets (`attach`) as it starts, so a restarted
frontend joins a group that already spreads (the program belongs to the group, not to one
socket). An index past the sockets present (a frontend is restarting) makes the kernel fall
back to its hash for that connection.

Loading needs the bpf() system call: CAP_BPF or CAP_SYS_ADMIN in the process's effective set
(or `kernel.unprivileged_bpf_disabled` = 0) and a seccomp profile that lets it through. In a
container that takes more than `--cap-add BPF` (a non-root user gets no added capability under
Docker; default seccomp profiles may allow bpf() only with CAP_SYS_ADMIN): docs/DEPLOYMENT.md,
"`--workers N` in a container". Where it is refused the server logs why and connections are
spread by the hash, as before. Only balance changes; nothing else depends
on it. The program is hand-assembled (15 instructions) so that no compiler or BPF library
is needed at run time.
"""

from __future__ import annotations

import ctypes
import os
import platform
import socket
import struct
import sys

_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351}
_BPF_MAP_CREATE, _BPF_PROG_LOAD = 0, 5
_BPF_MAP_TYPE_ARRAY = 2
_BPF_PROG_TYPE_SOCKET_FILTER = 1
SO_ATTACH_REUSEPORT_EBPF = 52  # include/uapi/asm-generic/socket.h
_SO_ACCEPTCONN = getattr(socket, "SO_ACCEPTCONN", 30)


class BalanceUnavailable(OSError):
    """The program could not be loaded or attached here (why is in the message)."""


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One eBPF instruction: opcode, dst/src registers, 16-bit offset, 32-bit immediate."""
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


def program(map_fd: int, frontends: int) -> bytes:
    """`counter += 1 (atomically); return counter % frontends` (0 if the map lookup fails).
    Not a fetch-and-add (kernel 5.12+), so that kernels back to 4.6 (SO_ATTACH_REUSEPORT_EBPF)
    should load it; tried on 6.18 only."""
    return b"".join([
        _insn(0x62, dst=10, off=-4, imm=0),  # *(u32 *)(r10 - 4) = 0: the key
        _insn(0x18, dst=1, src=1, imm=map_fd), _insn(0x00),  # r1 = the map (ld_imm64, pseudo map fd)
        _insn(0xBF, dst=2, src=10),  # r2 = r10
        _insn(0x07, dst=2, imm=-4),  # r2 += -4: &key
        _insn(0x85, imm=1),  # r0 = bpf_map_lookup_elem(r1, r2)
        _insn(0x15, dst=0, off=6, imm=0),  # if r0 == 0 goto the last two
        _insn(0xB7, dst=1, imm=1),  # r1 = 1
        _insn(0xDB, dst=0, src=1, off=0, imm=0),  # lock *(u64 *)r0 += r1 (XADD: any kernel since 4.6)
        _insn(0x79, dst=1, src=0, off=0),  # r1 = *(u64 *)r0 (a racing SYN may read the same: harmless)
        _insn(0x97, dst=1, imm=frontends),  # r1 %= frontends
        _insn(0xBF, dst=0, src=1),  # r0 = r1
        _insn(0x95),  # return r0: the index of the listening socket
        _insn(0xB7, dst=0, imm=0),  # r0 = 0
        _insn(0x95),
    ])


def _bpf(command: int, attr: bytes) -> int:
    number = _BPF_SYSCALL.get(platform.machine())
    if number is None or not sys.platform.startswith("linux"):
        raise BalanceUnavailable(f"no bpf() system call known on {platform.system()} {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(attr, len(attr))
    result = int(libc.syscall(number, command, buffer, len(attr)))
    if result < 0:
        error = ctypes.get_errno()
        raise BalanceUnavailable(error, f"bpf(): {os.strerror(error)}")
    return result


def load(frontends: int) -> int:
    """Load the round-robin program for `frontends` listeners; returns its file descriptor
    (the frontends get it through pass_fds). Raises BalanceUnavailable where bpf() is not allowed."""
    if frontends < 2:
        raise ValueError("round-robin spreading needs at least 2 frontends")
    map_fd = _bpf(_BPF_MAP_CREATE, struct.pack("<IIIII", _BPF_MAP_TYPE_ARRAY, 4, 8, 1, 0).ljust(72, b"\0"))
    try:
        code = program(map_fd, frontends)
        insns = ctypes.create_string_buffer(code, len(code))
        license_ = ctypes.create_string_buffer(b"GPL")
        log = ctypes.create_string_buffer(4096)
        attr = struct.pack("<IIQQIIQ", _BPF_PROG_TYPE_SOCKET_FILTER, len(code) // 8, ctypes.addressof(insns),
                           ctypes.addressof(license_), 1, len(log), ctypes.addressof(log)).ljust(128, b"\0")
        try:
            prog_fd = _bpf(_BPF_PROG_LOAD, attr)
        except BalanceUnavailable as exc:
            detail = log.value.decode(errors="replace").strip().splitlines()
            raise BalanceUnavailable(exc.errno, f"{exc.strerror}{': ' + detail[-1] if detail else ''}") from None
    finally:
        os.close(map_fd)  # the program holds the map
    return prog_fd


def listeners(port: int) -> list[int]:
    """This process's listening TCP sockets on `port` (grpc opens them; we only know the port)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            probe = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue  # gone meanwhile, or not a socket we can look at
        with probe:
            try:
                if (probe.family in (socket.AF_INET, socket.AF_INET6) and probe.type == socket.SOCK_STREAM
                        and probe.getsockopt(socket.SOL_SOCKET, _SO_ACCEPTCONN)
                        and probe.getsockname()[1] == port):
                    found.append(fd)
            except OSError:
                continue
    return found


def attach(prog_fd: int, port: int) -> int:
    """Attach the program to this process's listeners on `port` (so to their reuseport
    groups); returns how many. Raises BalanceUnavailable if there is none or one refuses."""
    fds = listeners(port)
    if not fds:
        raise BalanceUnavailable(f"no listening socket on port {port} in this process")
    for fd in fds:
        with socket.socket(fileno=os.dup(fd)) as sock:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, prog_fd)
            except OSError as exc:
                raise BalanceUnavailable(exc.errno, f"SO_ATTACH_REUSEPORT_EBPF: {exc.strerror}") from None
    return len(fds)
