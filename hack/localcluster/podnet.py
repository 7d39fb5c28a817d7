"""Pod networking for the local pod runner: every pod its own IP, hostname and DNS names.

kwok gives each pod an IP (`status.podIP`, from the cluster's pod CIDR) that nothing
answers on. The runner makes it real, the way a CNI plugin, the kubelet and cluster DNS
would on a cluster, so that a training of several pods rendezvouses between pods exactly
as it does there (MASTER_ADDR the node-0 pod's DNS name, port 29500 in every pod):

- a network namespace per pod whose `eth0` (one end of a veth pair) holds the pod IP; the
  other end is on a bridge of this runner, so pods reach each other directly (the pod CIDR
  is on-link), and this machine reaches a pod at its IP (a /32 route over the bridge);
- a UTS namespace whose hostname is the pod's, and a mount namespace in which /etc/hosts
  is the pod's own file, written as the kubelet writes it (localhost, the pod's own name →
  its IP) plus what cluster DNS answers for headless Services: the
  `<hostname>.<subdomain>.<namespace>.svc[.cluster.local]` records of the pods this runner
  runs, rewritten whenever one starts or stops. gloo and the rendezvous store resolve the
  hostname and bind to the pod IP, as in a pod;
- the API server, which listens on this machine's loopback, through a forwarder at the
  bridge's address (the pods' gateway, their view of the node).

Everything a pod gets is removed when its process ends, and the bridge and forwarder when
the runner stops; the bridge carries the runner's pid in its alias, so a runner that was
killed leaves nothing behind for long: the next one removes what dead runners left.
Needs root (network and mount namespaces), iproute2 and util-linux.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import os
import re
import select
import shutil
import socket
import socketserver
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .cluster import POD_CIDR

ALIAS = "neox-pod-runner"
TOOLS = ("ip", "unshare", "mount", "hostname")
CLUSTER_DOMAIN = "cluster.local"
# Run inside the pod's network namespace: its hostname, its /etc/hosts, then the container's command.
_ENTER = 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"'
_KUBELET_HOSTS = """\
# Kubernetes-managed hosts file (written by the local pod runner, as the kubelet would).
127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
fe00::0\tip6-localnet
fe00::1\tip6-allnodes
fe00::2\tip6-allrouters
"""
_runners = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def unsupported_reason() -> str | None:
    """None when pods can get their own network here; otherwise why not."""
    if os.geteuid() != 0:
        return "pod networking needs root (network and mount namespaces)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"pod networking needs {', '.join(missing)} (iproute2, util-linux)"
    return None


def dns_names(hostname: str, subdomain: str | None, namespace: str) -> tuple[str, ...]:
    """What cluster DNS resolves to a pod: its headless Service records (none without a subdomain)."""
    if not subdomain:
        return ()
    return (f"{hostname}.{subdomain}.{namespace}.svc.{CLUSTER_DOMAIN}", f"{hostname}.{subdomain}.{namespace}.svc",
            f"{hostname}.{subdomain}.{namespace}", f"{hostname}.{subdomain}")


@dataclass(frozen=True)
class Sandbox:
    """One pod's network: its namespace, its end of the bridge, its IP, hostname and hosts file."""

    netns: str
    host_link: str
    ip: str
    hostname: str
    names: tuple[str, ...]
    hosts_file: Path

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` as the pod runs it: in its network namespace, with its hostname and /etc/hosts.

        Every step execs the next, so the process started is the container's command itself
        (its pid, its exit code, its signals).
        """
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--mount", "/bin/sh", "-c", _ENTER,
                "pod-sandbox", self.hostname, str(self.hosts_file), *argv]


@dataclass
class PodNetwork:
    """The bridge, gateway and API forwarder of one runner, and the sandboxes of its pods."""

    apiserver_port: int
    log: Callable[[str], None] = print
    tag: str = field(default_factory=lambda: f"{os.getpid()}-{next(_runners)}")
    _sandboxes: dict[str, Sandbox] = field(default_factory=dict)
    _forwarder: "Forwarder | None" = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        digest = hashlib.sha256(self.tag.encode()).hexdigest()
        self._short = digest[:5]  # interface names are at most 15 characters
        self.bridge = f"nx{self._short}br"
        self.gateway = f"169.254.{int(digest[5:7], 16) % 253 + 1}.{int(digest[7:9], 16) % 253 + 1}"
        self._prefix_length = ipaddress.ip_network(POD_CIDR, strict=False).prefixlen

    @property
    def server(self) -> str:
        """The API server's URL as the pods reach it."""
        return f"https://{self.gateway}:{self.apiserver_port}"

    # ------------------------------------------------------------------ runner lifecycle
    def start(self) -> "PodNetwork":
        remove_leftovers(self.log)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "alias", f"{ALIAS} pid={os.getpid()} tag={self.tag}")
        _ip("addr", "add", f"{self.gateway}/32", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        self._forwarder = Forwarder((self.gateway, self.apiserver_port), ("127.0.0.1", self.apiserver_port))
        self._forwarder.start()
        return self

    def stop(self) -> None:
        for sandbox in list(self._sandboxes.values()):
            self.remove(sandbox)
        if self._forwarder is not None:
            self._forwarder.stop()
        _ip("link", "del", self.bridge, check=False)

    # ------------------------------------------------------------------ pods
    def add(self, uid: str, ip: str, hostname: str, names: tuple[str, ...], workdir: Path) -> Sandbox:
        """Give a pod its network namespace with `ip`; its hosts file lives in `workdir`."""
        key = hashlib.sha256(uid.encode()).hexdigest()[:6]
        sandbox = Sandbox(netns=f"neox-{self.tag}-{key}", host_link=f"nx{self._short}{key}", ip=ip,
                          hostname=hostname, names=names, hosts_file=workdir / "hosts")
        sandbox.hosts_file.write_text(_KUBELET_HOSTS)
        try:
            self._plumb(sandbox)
        except Exception:
            self._unplumb(sandbox)
            raise
        with self._lock:
            self._sandboxes[sandbox.netns] = sandbox
        self._publish()
        return sandbox

    def remove(self, sandbox: Sandbox) -> None:
        """Take a pod's network down once its processes are gone."""
        with self._lock:
            attached = self._sandboxes.pop(sandbox.netns, None) is not None
        if attached:
            self._unplumb(sandbox)
            self._publish()
        else:  # detached already: its IP (and route) may be another pod's now
            _ip("netns", "del", sandbox.netns, check=False)

    def spare_ip(self) -> str:
        """An address of the pod CIDR no pod here has, from its top (kwok allocates from the bottom)."""
        network = ipaddress.ip_network(POD_CIDR, strict=False)
        with self._lock:
            taken = {s.ip for s in self._sandboxes.values()}
        return next(str(ip) for ip in (network.broadcast_address - k for k in range(1, network.num_addresses - 1))
                    if str(ip) not in taken)

    def detach(self, sandbox: Sandbox) -> None:
        """Take a stopping pod off the network and out of DNS, so that its IP can go to a new pod.

        kwok hands a deleted pod's IP to the next pod at once, while the deleted pod's
        processes may still be in their grace period (or hung on a lost peer); a cluster
        would keep the IP until they are gone. The old pod keeps its namespace (and its
        loopback) until it exits; only its link to the bridge goes.
        """
        with self._lock:
            self._sandboxes.pop(sandbox.netns, None)
        _ip("route", "del", f"{sandbox.ip}/32", "dev", self.bridge, check=False)
        _ip("link", "del", sandbox.host_link, check=False)
        self._publish()

    def _plumb(self, sandbox: Sandbox) -> None:
        ns, link = sandbox.netns, sandbox.host_link
        _ip("netns", "add", ns)
        _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", link, "master", self.bridge, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        # The pod CIDR on-link: peers are reached over the bridge directly, without forwarding.
        _ip("-n", ns, "addr", "add", f"{sandbox.ip}/{self._prefix_length}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "route", "add", self.gateway, "dev", "eth0", "scope", "link")
        _ip("-n", ns, "route", "add", "default", "via", self.gateway, "dev", "eth0")
        _ip("route", "replace", f"{sandbox.ip}/32", "dev", self.bridge, "src", self.gateway)

    def _unplumb(self, sandbox: Sandbox) -> None:
        _ip("route", "del", f"{sandbox.ip}/32", "dev", self.bridge, check=False)
        _ip("netns", "del", sandbox.netns, check=False)  # the veth pair goes with it
        _ip("link", "del", sandbox.host_link, check=False)

    def _publish(self) -> None:
        """Rewrite every pod's /etc/hosts: its own line, then the cluster DNS records of all pods.

        Written in place (the file is bind-mounted in the pod, by inode).
        """
        with self._lock:
            sandboxes = list(self._sandboxes.values())
        records = "".join(f"{s.ip}\t{' '.join(s.names)}\n" for s in sandboxes if s.names)
        for sandbox in sandboxes:
            own = f"{sandbox.ip}\t{' '.join(sandbox.names[:1] + (sandbox.hostname,))}\n"
            text = _KUBELET_HOSTS + own + "# cluster DNS: headless Service records of the pods\n" + records
            if sandbox.hosts_file.exists() and sandbox.hosts_file.read_text() != text:
                with open(sandbox.hosts_file, "r+") as f:
                    f.write(text)
                    f.truncate()


def remove_leftovers(log: Callable[[str], None] = print) -> None:
    """Remove the bridges and namespaces of runners whose process is gone (killed without cleanup)."""
    dead = set()
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        match = re.search(r"^\d+: ([^:@]+)[:@].*alias " + ALIAS + r" pid=(\d+) tag=(\S+)", line)
        if match and not _alive(int(match.group(2))):
            dead.add(match.group(3))
            _ip("link", "del", match.group(1), check=False)
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(r"neox-(\d+)-(\d+)-[0-9a-f]+", name)
        if match and (f"{match.group(1)}-{match.group(2)}" in dead or not _alive(int(match.group(1)))):
            _ip("netns", "del", name, check=False)
    if dead:
        log(f"Removed the pod networks of stopped pod runners: {sorted(dead)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class Forwarder(socketserver.ThreadingTCPServer):
    """TCP from an address the pods reach to a service on this machine's loopback (the API server)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]):
        self.target = target
        super().__init__(listen, _Splice)
        self._thread = threading.Thread(target=self.serve_forever, name="pod-api-forwarder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Splice(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with socket.create_connection(self.server.target) as upstream:  # type: ignore[attr-defined]
            peers = {self.request: upstream, upstream: self.request}
            while True:
                readable, _, _ = select.select(list(peers), [], [])
                for sock in readable:
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    peers[sock].sendall(data)
