"""Start, inspect and stop the local control plane: real binaries on loopback.

etcd → kube-apiserver (RBAC, ServiceAccount tokens) → kube-controller-manager (Jobs,
Deployments, garbage collection, HPA, ...) → kube-scheduler → kwok, which plays the
kubelet for fake GPU nodes. All state (certificates, etcd data, logs, pid files, the
admin kubeconfig) lives in one directory, so `down` can stop everything it started and
wipe it. `up` on a running cluster only checks it and returns.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from . import build, nodes

DEFAULT_STATE_DIR = build.CACHE_ROOT / "cluster"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "provisioner")
SERVICE_CIDR = "10.96.0.0/16"  # allocation only: nothing on this machine routes to it
POD_CIDR = "10.244.0.0/16"  # kwok assigns pod IPs from it; the pod runner makes them real (podnet)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int

    @classmethod
    def allocate(cls) -> "Ports":
        return cls(*(free_port() for _ in range(6)))


@dataclass
class LocalCluster:
    """One control plane whose state lives in `state_dir`."""

    state_dir: Path = field(default_factory=lambda: DEFAULT_STATE_DIR)
    gpu_nodes: int = 3
    log: callable = print

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "admin.kubeconfig"

    @property
    def _ports_file(self) -> Path:
        return self.state_dir / "ports.json"

    def _pid_file(self, name: str) -> Path:
        return self.state_dir / "pids" / f"{name}.pid"

    def _running_pid(self, name: str) -> int | None:
        try:
            pid = int(self._pid_file(name).read_text())
            os.kill(pid, 0)
            return pid
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None

    def is_running(self) -> bool:
        return all(self._running_pid(name) for name in COMPONENTS) and self._ready()

    # ------------------------------------------------------------------ up
    def up(self, timeout: float = 180.0) -> Path:
        """Start whatever is not running and wait until the cluster is usable."""
        if self.is_running():
            self.log(f"Local cluster already running in {self.state_dir}")
            return self.kubeconfig
        self.down(wipe=False)  # a half-started cluster is stopped before starting anew
        bins = build.ensure_built(log=self.log)
        started = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        ports = Ports.allocate()
        self._ports_file.write_text(json.dumps(ports.__dict__))
        self._write_credentials(ports)
        self._start_etcd(bins, ports)
        self._start_apiserver(bins, ports)
        self._wait(lambda: self._ready(), timeout, "kube-apiserver /readyz")
        self._start_controller_manager(bins, ports)
        self._start_scheduler(bins, ports)
        self._start_kwok(bins, ports)
        self._start_provisioner(bins)
        nodes.register_gpu_nodes(self.kubectl, self.gpu_nodes)
        self._wait(lambda: nodes.ready_count(self.kubectl) >= self.gpu_nodes, timeout, "nodes Ready")
        self._wait(self._default_service_account_exists, timeout, "default ServiceAccount")
        self._make_pod_ip_pool(timeout)
        self.log(f"Local cluster up in {time.monotonic() - started:.1f}s; state in {self.state_dir}")
        return self.kubeconfig

    def _make_pod_ip_pool(self, timeout: float) -> None:
        """Have kwok assign one pod IP before any workload does.

        kwok creates its pod-IP pool on first use without a lock: pods it starts at the same
        moment in a fresh kwok can get the same IP (two pods of a Job at 10.244.0.0). One
        pod started alone first creates the pool; every later IP is unique.
        """
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kwok-pod-ip-pool", "namespace": "default"},
               "spec": {"nodeName": nodes.node_name(0), "automountServiceAccountToken": False,
                        "containers": [{"name": "pause", "image": "registry.k8s.io/pause:3.10"}]}}
        self.kubectl("apply", "-f", "-", input=json.dumps(pod))
        self._wait(lambda: json.loads(self.kubectl("get", "pod", "kwok-pod-ip-pool", "-n", "default", "-o", "json")
                                      .stdout).get("status", {}).get("podIP"), timeout, "a first pod IP from kwok")
        self.kubectl("delete", "pod", "kwok-pod-ip-pool", "-n", "default", "--wait=false")

    def _write_credentials(self, ports: Ports) -> None:
        pki = self.state_dir / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        if not (pki / "sa.key").exists():
            subprocess.run(["openssl", "genrsa", "-out", str(pki / "sa.key"), "2048"],
                           check=True, capture_output=True)
            subprocess.run(["openssl", "rsa", "-in", str(pki / "sa.key"), "-pubout",
                            "-out", str(pki / "sa.pub")], check=True, capture_output=True)
        tokens = {"admin": ("admin", "system:masters"),
                  "controller-manager": ("system:kube-controller-manager", ""),
                  "scheduler": ("system:kube-scheduler", ""),
                  "kwok": ("kwok", "system:masters")}
        lines = []
        for name, (user, groups) in tokens.items():
            token = os.urandom(16).hex()
            lines.append(f'{token},{user},{user},"{groups}"' if groups else f"{token},{user},{user}")
            self._write_kubeconfig(self.state_dir / f"{name}.kubeconfig", ports.apiserver, token, user)
        (pki / "tokens.csv").write_text("\n".join(lines) + "\n")

    @staticmethod
    def _write_kubeconfig(path: Path, port: int, token: str, user: str) -> None:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "neox-local",
            "clusters": [{"name": "neox-local", "cluster": {
                "server": f"https://127.0.0.1:{port}", "insecure-skip-tls-verify": True}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "neox-local", "context": {"cluster": "neox-local", "user": user}}],
        }
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        logs = self.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self._pid_file(name).parent.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self._pid_file(name).write_text(str(proc.pid))

    def _start_etcd(self, bins: Path, ports: Ports) -> None:
        self._spawn("etcd", [
            str(bins / "etcd"), "--name", "neox-local",
            "--data-dir", str(self.state_dir / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{ports.etcd_client}",
            "--advertise-client-urls", f"http://127.0.0.1:{ports.etcd_client}",
            "--listen-peer-urls", f"http://127.0.0.1:{ports.etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{ports.etcd_peer}",
            "--initial-cluster", f"neox-local=http://127.0.0.1:{ports.etcd_peer}",
            "--unsafe-no-fsync", "--quota-backend-bytes", str(4 << 30), "--log-level", "warn",
        ])

    def _start_apiserver(self, bins: Path, ports: Ports) -> None:
        pki = self.state_dir / "pki"
        self._spawn("kube-apiserver", [
            str(bins / "kube-apiserver"),
            "--etcd-servers", f"http://127.0.0.1:{ports.etcd_client}",
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--secure-port", str(ports.apiserver), "--cert-dir", str(pki),
            "--token-auth-file", str(pki / "tokens.csv"),
            "--authorization-mode", "Node,RBAC",
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", str(pki / "sa.pub"),
            "--service-account-signing-key-file", str(pki / "sa.key"),
            "--service-cluster-ip-range", SERVICE_CIDR, "--allow-privileged",
            "--enable-admission-plugins", "NamespaceLifecycle,ServiceAccount,DefaultStorageClass,"
            "ResourceQuota,LimitRanger,Priority,DefaultTolerationSeconds",
            "--profiling=false", "--v", "1",
        ])

    def _start_controller_manager(self, bins: Path, ports: Ports) -> None:
        pki = self.state_dir / "pki"
        self._spawn("kube-controller-manager", [
            str(bins / "kube-controller-manager"),
            "--kubeconfig", str(self.state_dir / "controller-manager.kubeconfig"),
            "--authentication-skip-lookup", "--authorization-always-allow-paths", "/healthz,/readyz",
            "--bind-address", "127.0.0.1", "--secure-port", str(ports.controller_manager),
            "--leader-elect=false", "--controllers", "*",
            "--service-account-private-key-file", str(pki / "sa.key"),
            "--root-ca-file", str(pki / "apiserver.crt"),
            "--use-service-account-credentials=true",
            "--service-cluster-ip-range", SERVICE_CIDR,
            # Node loss is noticed quickly, so tests of it stay short.
            "--node-monitor-grace-period", "20s", "--node-monitor-period", "2s",
            "--horizontal-pod-autoscaler-sync-period", "5s",
            "--concurrent-job-syncs", "10", "--profiling=false", "--v", "1",
        ])

    def _start_scheduler(self, bins: Path, ports: Ports) -> None:
        self._spawn("kube-scheduler", [
            str(bins / "kube-scheduler"),
            "--kubeconfig", str(self.state_dir / "scheduler.kubeconfig"),
            "--authentication-skip-lookup", "--authorization-always-allow-paths", "/healthz,/readyz",
            "--bind-address", "127.0.0.1", "--secure-port", str(ports.scheduler),
            "--leader-elect=false", "--profiling=false", "--v", "1",
        ])

    def _start_kwok(self, bins: Path, ports: Ports) -> None:
        stages = self.state_dir / "kwok-stages.yaml"
        stages.write_text(nodes.KWOK_STAGES)
        self._spawn("kwok", [
            str(bins / "kwok"),
            "--kubeconfig", str(self.state_dir / "kwok.kubeconfig"),
            "--config", str(stages),
            "--manage-all-nodes=false",
            "--manage-nodes-with-label-selector", f"{nodes.KWOK_LABEL}={nodes.KWOK_LABEL_VALUE}",
            "--node-lease-duration-seconds", "40",
            "--cidr", POD_CIDR, "--node-ip", "10.0.0.1",
            "--server-address", f"127.0.0.1:{ports.kwok}",
        ])

    @property
    def volumes_dir(self) -> Path:
        """Where the local provisioner keeps each claim's data: `<namespace>/<claim>/`."""
        return self.state_dir / "volumes"

    def _start_provisioner(self, bins: Path) -> None:
        self._spawn("provisioner", [
            sys.executable, "-m", "localcluster.provisioner", "--kubectl", str(bins / "kubectl"),
            "--kubeconfig", str(self.kubeconfig), "--root", str(self.volumes_dir),
        ], env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})

    # ------------------------------------------------------------------ checks
    def _ports(self) -> Ports | None:
        try:
            return Ports(**json.loads(self._ports_file.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def server(self) -> str:
        """URL of the API server."""
        ports = self._ports()
        assert ports is not None, "the cluster has not been started"
        return f"https://127.0.0.1:{ports.apiserver}"

    def _admin_token(self) -> str:
        return json.loads(self.kubeconfig.read_text())["users"][0]["user"]["token"]

    def _ready(self) -> bool:
        ports = self._ports()
        if ports is None or not self.kubeconfig.exists():
            return False
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        request = urllib.request.Request(f"https://127.0.0.1:{ports.apiserver}/readyz",
                                         headers={"Authorization": f"Bearer {self._admin_token()}"})
        try:
            with urllib.request.urlopen(request, context=context, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def _default_service_account_exists(self) -> bool:
        return self.kubectl("get", "serviceaccount", "default", "-n", "default",
                            check=False).returncode == 0

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name in COMPONENTS:
                if self._pid_file(name).exists() and not self._running_pid(name):
                    raise RuntimeError(f"{name} exited while waiting for {what}; see "
                                       f"{self.state_dir / 'logs' / (name + '.log')}")
            if predicate():
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; logs in {self.state_dir / 'logs'}")

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(build.binary("kubectl")), "--kubeconfig", str(self.kubeconfig), *args],
                              text=True, capture_output=True, input=input)
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def install_crds(self, directory: Path, timeout: float = 60.0) -> None:
        """Apply every CRD in `directory` and wait until the API server serves them.

        Polled here rather than with `kubectl wait`, which fails at once when it reads a
        new CRD whose status has no conditions yet.
        """
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(directory))
        names = self.kubectl("get", "-f", str(directory), "-o", "name").stdout.split()

        def established() -> bool:
            crds = json.loads(self.kubectl("get", *names, "-o", "json").stdout)["items"]
            return all(any(c["type"] == "Established" and c["status"] == "True"
                           for c in crd.get("status", {}).get("conditions") or []) for crd in crds)

        self._wait(established, timeout, f"the CRDs in {directory} to be established")

    # ------------------------------------------------------------------ down
    def down(self, wipe: bool = True) -> None:
        """Stop every component this state directory started; optionally wipe the state."""
        for name in reversed(COMPONENTS):
            pid = self._running_pid(name)
            if pid is not None:
                _terminate(pid)
            self._pid_file(name).unlink(missing_ok=True)
        if wipe and self.state_dir.exists():
            subprocess.run(["rm", "-rf", str(self.state_dir)], check=True)


def _terminate(pid: int, grace: float = 10.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # Reap it if it is our child (started by this process, e.g. in pytest).
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
