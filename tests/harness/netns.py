"""A process in a network namespace of its own, reaching services over veth links that a
test can black-hole.

``Netns(tag)`` creates one namespace; ``link(name, subnet)`` adds a veth pair between it
and the root namespace: ``SUBNET.1`` on the root side (where the services listen),
``SUBNET.2`` inside. ``cut(name)`` takes the root-side end down: packets vanish without a
reset in either direction, as behind a firewall that drops them (this kernel has no
netem), and the namespace's end keeps its address and routes. ``heal(name)`` brings it
back. Every address lives on these links (``10.232.x.y`` by default), and ``cleanup()``
deletes the namespace, which deletes its veth pairs too; it is safe to call twice and
after a partial ``create``.

``python_prefix()`` is the interpreter argument list that runs ``python -m ...`` inside
the namespace (``GatewayProcess(python_args=...)``); ``call(fn)`` runs ``fn`` on a thread
that entered the namespace, so sockets it opens (a ``/readyz`` probe) live there.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from collections.abc import Callable
from typing import TypeVar

from .services import ServiceError

__all__ = ["Netns"]

T = TypeVar("T")
_CLONE_NEWNET = 0x40000000

# Run as ``python -c BOOT NAMESPACE -m MODULE ARGS...``: enter the namespace, then run the
# module as ``python -m`` would, with the same argv.
_BOOT = """\
import ctypes, os, runpy, sys
fd = os.open('/run/netns/' + sys.argv[1], os.O_RDONLY)
if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
    raise SystemExit('setns failed: errno %d' % ctypes.get_errno())
os.close(fd)
assert sys.argv[2] == '-m'
sys.argv = [sys.argv[3], *sys.argv[4:]]
runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
"""


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise ServiceError(f"ip {' '.join(args)}: {r.stderr.strip()}")


class Netns:
    """One network namespace with veth links to the root namespace (module doc)."""

    def __init__(self, tag: str) -> None:
        self.name = f"vgf{tag}"[:15]
        self.links: dict[str, tuple[str, str, str]] = {}  # name -> (root-side interface, root addr, inner addr)
        self._created = False

    def create(self) -> Netns:
        _ip("netns", "add", self.name)
        self._created = True
        _ip("-n", self.name, "link", "set", "lo", "up")
        return self

    def link(self, name: str, subnet: str) -> tuple[str, str]:
        """A veth pair to the root namespace on ``subnet`` (``"10.232.1"``); returns
        (root-side address, inner address)."""
        outer = f"{self.name}{name}"[:15]
        root_addr, inner_addr = f"{subnet}.1", f"{subnet}.2"
        _ip("link", "add", outer, "type", "veth", "peer", "name", f"e{name}"[:15], "netns", self.name)
        self.links[name] = (outer, root_addr, inner_addr)
        _ip("addr", "add", f"{root_addr}/24", "dev", outer)
        _ip("link", "set", outer, "up")
        _ip("-n", self.name, "addr", "add", f"{inner_addr}/24", "dev", f"e{name}"[:15])
        _ip("-n", self.name, "link", "set", f"e{name}"[:15], "up")
        return root_addr, inner_addr

    def cut(self, name: str) -> None:
        """Black-hole the link: its root-side end goes down, nothing answers, nothing resets."""
        _ip("link", "set", self.links[name][0], "down")

    def heal(self, name: str) -> None:
        _ip("link", "set", self.links[name][0], "up")

    def python_prefix(self) -> list[str]:
        """Interpreter arguments that make ``python ARGS -m MODULE ...`` run inside the namespace."""
        return ["-c", _BOOT, self.name]

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """``fn()`` on a fresh thread inside the namespace; its result or its exception."""
        out: list[T] = []
        err: list[BaseException] = []

        def run() -> None:
            try:
                fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
                try:
                    if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
                        raise ServiceError(f"setns({self.name}) failed: errno {ctypes.get_errno()}")
                finally:
                    os.close(fd)
                out.append(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                err.append(exc)

        t = threading.Thread(target=run, name=f"in-{self.name}", daemon=True)
        t.start()
        t.join(timeout)
        if err:
            raise err[0]
        if not out:
            raise TimeoutError(f"no answer within {timeout:g} s inside {self.name}")
        return out[0]

    def cleanup(self) -> None:
        """Delete the namespace (and with it every veth pair); idempotent."""
        for outer, _, _ in self.links.values():
            subprocess.run(["ip", "link", "del", outer], capture_output=True, timeout=30)
        self.links.clear()
        if self._created:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)
            self._created = False
