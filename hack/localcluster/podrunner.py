"""Run the containers of kwok pods as real local processes: a kubelet for development.

kwok makes pods Running without running anything. For the demo and the end-to-end
tests we want the real runtime behind those pods: this runner watches pods that carry
a chosen label, and for each one that kwok reports Running it starts the container's
command on this machine, with the environment the pod would have had:

- env values, including downward-API fields (the Job completion index, pod name, ...),
  ConfigMap and Secret keys;
- volumes as directories: a ConfigMap or Secret is written out, a PersistentVolumeClaim
  is a directory per claim under the state dir (so checkpoints outlive pods, as on a
  real cluster), an emptyDir is a fresh directory; mount paths in env values and args
  are rewritten to those directories;
- the pod's ServiceAccount as a kubeconfig (a real token, so RBAC applies as in a pod);
- its own network, as on a cluster (`podnet`, when run as root): the pod IP kwok assigned
  on the pod's own interface, its hostname, and an /etc/hosts that resolves the DNS names
  of the pods of headless Services, so MASTER_ADDR (the node-0 pod's DNS name) and port
  29500 are used as rendered, and the ranks of different pods meet across pod IPs;
- without root (`networking="host"`), pods share this machine's loopback instead:
  MASTER_ADDR becomes 127.0.0.1, each Job gets its own MASTER_PORT, and a server's
  `--port P` moves to a free loopback port so that replicas do not collide;
- init containers run first, in order, in the same process chain (a failing one fails
  the pod, as on a kubelet);
- where to reach a server's `--port P` from this machine is published in the pod's
  `localcluster.neox.dev/addresses` annotation, `{"P": "host:port"}` (the pod IP and P,
  or the loopback port it moved to).

When the process exits, the pod is annotated with its exit code and kwok ends the pod
the way a kubelet would (Succeeded or Failed), and whatever it left running is killed (as
when a container's PID 1 exits). When the pod is deleted, the process gets SIGTERM (it
alone, as a container's PID 1 does: forwarding it is its job), then its whole process
group SIGKILL after the pod's grace period, like a real container.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from urllib.parse import urlparse

from . import nodes, podnet, provisioner
from .cluster import free_port

Kubectl = Callable[..., subprocess.CompletedProcess]
ADDRESSES_ANNOTATION = "localcluster.neox.dev/addresses"


@dataclass
class LocalPod:
    namespace: str
    name: str
    uid: str
    process: subprocess.Popen
    workdir: Path
    grace_seconds: int
    sandbox: podnet.Sandbox | None = None  # its own network, under pod networking
    attached: bool = True  # False once taken off the network (its IP went to a new pod)
    terminating_since: float | None = None


@dataclass
class PodRunner:
    """Watch pods matching `selector` in `namespace` and run them locally.

    `networking`: "pod" gives every pod its own network (needs root), "host" runs them on
    this machine's loopback, "auto" (the default) is "pod" where it can be set up; after
    `start` it says which one is in use.
    """

    kubectl: Kubectl
    namespace: str
    selector: str
    state_dir: Path
    server: str
    path_prefix: list[str] = field(default_factory=list)
    log: Callable[[str], None] = print
    poll_seconds: float = 0.5
    networking: str = "auto"
    _network: podnet.PodNetwork | None = None
    _pods: dict[str, LocalPod] = field(default_factory=dict)
    _job_ports: dict[str, int] = field(default_factory=dict)
    _ended: set[str] = field(default_factory=set)  # uids whose process ran and exited (restartPolicy Never)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "PodRunner":
        assert self.networking in ("auto", "pod", "host"), self.networking
        if self.networking != "host":
            self._start_pod_network()
        self._thread = threading.Thread(target=self._loop, name="podrunner", daemon=True)
        self._thread.start()
        return self

    def _start_pod_network(self) -> None:
        reason = podnet.unsupported_reason()
        if reason is None:
            try:
                self._network = podnet.PodNetwork(apiserver_port=urlparse(self.server).port, log=self.log).start()
            except RuntimeError as error:
                reason = str(error)
        if reason is not None and self.networking == "pod":
            raise RuntimeError(f"pod networking requested, but {reason}")
        self.networking = "pod" if reason is None else "host"
        if reason is not None:
            self.log(f"Pods share this machine's loopback network: {reason}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        for pod in list(self._pods.values()):
            self._terminate(pod, force_after=5)
            self._release(pod)
        self._pods.clear()
        if self._network is not None:
            self._network.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as error:  # noqa: BLE001 - the runner must outlive API hiccups
                self.log(f"Pod runner sync failed: {error}")
            self._stop.wait(self.poll_seconds)

    def sync(self) -> None:
        proc = self.kubectl("get", "pods", "-n", self.namespace, "-l", self.selector, "-o", "json", check=False)
        if proc.returncode != 0:
            return
        seen = set()
        for pod in json.loads(proc.stdout)["items"]:
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            local = self._pods.get(uid)
            if pod["metadata"].get("deletionTimestamp"):
                if local:
                    self._begin_termination(local)
            elif local is None and uid not in self._ended and pod["status"].get("phase") == "Running":
                launched = self._launch(pod)
                if launched is not None:
                    self._pods[uid] = launched
        for uid, local in list(self._pods.items()):
            if uid not in seen:
                self._begin_termination(local)
            exit_code = local.process.poll()
            if exit_code is not None:
                exit_code = 128 - exit_code if exit_code < 0 else exit_code  # killed by signal N: 128 + N
                self._pods.pop(uid)
                self._ended.add(uid)
                _kill_group(local.process)
                self._release(local)
                if uid in seen and local.terminating_since is None:
                    self.log(f"Pod {local.name} exited with code {exit_code}")
                    self.kubectl("annotate", "pod", local.name, "-n", local.namespace, "--overwrite",
                                 f"{nodes.EXIT_CODE_ANNOTATION}={exit_code}", check=False)
            elif local.terminating_since and time.monotonic() - local.terminating_since > local.grace_seconds:
                _kill_group(local.process)

    # ------------------------------------------------------------------ launching
    def _pod_ip(self, pod: dict[str, Any]) -> str:
        """The address the pod gets its own network at: kwok's status.podIP, unless it is taken.

        kwok hands a deleted pod's IP to the next pod at once, while ours may still be
        stopping: the stopping one leaves the network (it is deleted, nothing may reach it
        any more). Two live pods with one IP (kwok can do that to pods it starts at the same
        moment) cannot both have it: the second gets a spare address, and its downward API,
        DNS records and published addresses say so.
        """
        ip = pod["status"]["podIP"]
        holder = next((p for p in self._pods.values() if p.sandbox and p.sandbox.ip == ip and p.attached), None)
        if holder is None:
            return ip
        if holder.terminating_since is not None:
            self.log(f"Pod {holder.name} is still stopping: taking it off the network for pod "
                     f"{pod['metadata']['name']}, which was given its IP {ip}")
            self._network.detach(holder.sandbox)
            holder.attached = False
            return ip
        spare = self._network.spare_ip()
        self.log(f"Pod {pod['metadata']['name']} was given IP {ip}, which running pod {holder.name} has: "
                 f"using {spare} instead")
        return spare

    def _launch(self, pod: dict[str, Any]) -> LocalPod | None:
        meta, spec = pod["metadata"], pod["spec"]
        own_network = self._network is not None and not spec.get("hostNetwork")
        if own_network and not pod["status"].get("podIP"):
            return None  # kwok sets it with Running; wait for it
        ip = self._pod_ip(pod) if own_network else None
        workdir = self.state_dir / "pods" / f"{meta['namespace']}_{meta['name']}"
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        container = spec["containers"][0]
        argvs = []
        for c in spec.get("initContainers", []) + [container]:
            mounts = self._materialize_volumes(pod, c, workdir)
            argvs.append([_rewrite(arg, mounts) for arg in c.get("command", []) + c.get("args", [])])
        env = self._environment(pod, container, mounts, workdir, ip)  # the main container's
        addresses = _publish_port(argvs[-1], ip)
        if addresses:
            self.kubectl("annotate", "pod", meta["name"], "-n", meta["namespace"], "--overwrite",
                         f"{ADDRESSES_ANNOTATION}={json.dumps(addresses)}", check=False)
        argv = argvs[-1] if len(argvs) == 1 else [
            "/bin/sh", "-c", " && ".join([shlex.join(a) for a in argvs[:-1]] + [f"exec {shlex.join(argvs[-1])}"])]
        sandbox = None
        if ip is not None:
            hostname = _hostname(pod)
            sandbox = self._network.add(meta["uid"], ip, hostname,
                                        podnet.dns_names(hostname, spec.get("subdomain"), meta["namespace"]), workdir)
            argv = sandbox.wrap(argv)
        log_file = open(workdir / "container.log", "ab")  # noqa: SIM115 - closed with the process
        where = f"at {ip} ({sandbox.hostname})" if sandbox else "on the host network"
        self.log(f"Starting pod {meta['name']} locally {where}: {' '.join(argv)} (log: {workdir / 'container.log'})")
        try:
            process = subprocess.Popen(argv, env=env, cwd=workdir, stdout=log_file, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError:
            if sandbox is not None:
                self._network.remove(sandbox)
            raise
        finally:
            log_file.close()
        return LocalPod(meta["namespace"], meta["name"], meta["uid"], process, workdir,
                        int(spec.get("terminationGracePeriodSeconds", 30)), sandbox)

    def _release(self, pod: LocalPod) -> None:
        """Take down what the pod had besides its process: its network."""
        if pod.sandbox is not None and self._network is not None:
            self._network.remove(pod.sandbox)

    def _materialize_volumes(self, pod: dict[str, Any], container: dict[str, Any], workdir: Path) -> dict[str, Path]:
        """mountPath → local directory (or file, for subPath mounts)."""
        namespace = pod["metadata"]["namespace"]
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                local = self._claim_path(namespace, volume["persistentVolumeClaim"]["claimName"])
            elif "configMap" in volume or "secret" in volume:
                local = workdir / "volumes" / mount["name"]
                self._write_keys(namespace, volume, local)
            else:  # emptyDir and anything else: a scratch directory
                local = workdir / "volumes" / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            if mount.get("subPath"):
                local = local / mount["subPath"]
            mounts[mount["mountPath"]] = local
        return mounts

    def _claim_path(self, namespace: str, claim: str) -> Path:
        path = provisioner.bound_path(self.kubectl, namespace, claim)
        if path is None:
            raise RuntimeError(f"claim {namespace}/{claim} is not bound yet")
        return path

    def _write_keys(self, namespace: str, volume: dict[str, Any], target: Path) -> None:
        kind, source = ("configmap", volume["configMap"]) if "configMap" in volume else ("secret", volume["secret"])
        name = source.get("name") or source.get("secretName")
        obj = json.loads(self.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout)
        data = obj.get("data") or {}
        target.mkdir(parents=True, exist_ok=True)
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            value = data.get(item["key"], "")
            if kind == "secret":
                (target / item["path"]).write_bytes(base64.b64decode(value))
            else:
                (target / item["path"]).write_text(value)

    def _environment(self, pod: dict[str, Any], container: dict[str, Any], mounts: dict[str, Path],
                     workdir: Path, pod_ip: str | None) -> dict[str, str]:
        """The main container's env; `pod_ip` None: the pod shares the host's network."""
        on_host = pod_ip is None
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG",)}
        if self.path_prefix:
            env["PATH"] = os.pathsep.join(self.path_prefix + [env.get("PATH", "")])
        for item in container.get("env", []):
            value = item.get("value")
            if value is None and "valueFrom" in item:
                value = self._value_from(pod, item["valueFrom"], pod_ip)
            if value is not None:
                env[item["name"]] = _rewrite(str(value), mounts)
        job = pod["metadata"].get("labels", {}).get("job-name") or pod["metadata"]["name"]
        if on_host and "MASTER_ADDR" in env:  # pods share one loopback: a port per Job instead of an address per pod
            env["MASTER_ADDR"] = "127.0.0.1"
            env["MASTER_PORT"] = str(self._job_ports.setdefault(job, free_port()))
        server = self.server if on_host else self._network.server
        env["KUBECONFIG"] = str(self._service_account_kubeconfig(pod, workdir, server))
        env["HOSTNAME"] = _hostname(pod)
        return env

    def _value_from(self, pod: dict[str, Any], source: dict[str, Any], pod_ip: str | None) -> str | None:
        if "fieldRef" in source:
            if pod_ip is None:
                local = {"status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}
            else:  # the pod's own IP; the node is the gateway it reaches this machine by
                local = {"status.podIP": pod_ip, "status.hostIP": self._network.gateway}
            return local.get(source["fieldRef"]["fieldPath"]) or _field_path(pod, source["fieldRef"]["fieldPath"])
        for key, kind in (("configMapKeyRef", "configmap"), ("secretKeyRef", "secret")):
            if key in source:
                ref = source[key]
                obj = json.loads(self.kubectl("get", kind, ref["name"], "-n", pod["metadata"]["namespace"],
                                              "-o", "json").stdout)
                value = (obj.get("data") or {}).get(ref["key"])
                if kind == "secret" and value is not None:
                    value = base64.b64decode(value).decode()
                return value
        return None

    def _service_account_kubeconfig(self, pod: dict[str, Any], workdir: Path, server: str) -> Path:
        account = pod["spec"].get("serviceAccountName", "default")
        token = self.kubectl("create", "token", account, "-n", pod["metadata"]["namespace"],
                             "--duration", "2h").stdout.strip()
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "pod",
            "clusters": [{"name": "local", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
            "users": [{"name": account, "user": {"token": token}}],
            "contexts": [{"name": "pod", "context": {"cluster": "local", "user": account,
                                                     "namespace": pod["metadata"]["namespace"]}}],
        }
        path = workdir / "serviceaccount.kubeconfig"
        path.write_text(json.dumps(config))
        return path

    def kill(self, pod_name: str, signum: int = signal.SIGKILL) -> bool:
        """Signal a running pod (a chaos hook for tests); False if it is not running here.

        SIGKILL takes every process of the pod at once, as a lost node does; any other
        signal goes to its main process only, as a kubelet's SIGTERM would.
        """
        for pod in self._pods.values():
            if pod.name == pod_name and pod.process.poll() is None:
                if signum == signal.SIGKILL:
                    _kill_group(pod.process)
                else:
                    pod.process.send_signal(signum)
                return True
        return False

    # ------------------------------------------------------------------ termination
    def _begin_termination(self, pod: LocalPod) -> None:
        if pod.terminating_since is None and pod.process.poll() is None:
            self.log(f"Pod {pod.name} is being deleted: sending SIGTERM")
            pod.process.send_signal(signal.SIGTERM)
        if pod.terminating_since is None:
            pod.terminating_since = time.monotonic()

    def _terminate(self, pod: LocalPod, force_after: float) -> None:
        self._begin_termination(pod)
        try:
            pod.process.wait(timeout=force_after)
        except subprocess.TimeoutExpired:
            pass
        _kill_group(pod.process)
        pod.process.wait()


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL every process of a pod (its own session and process group, led by its main process)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _publish_port(argv: list[str], pod_ip: str | None) -> dict[str, str]:
    """Where this machine reaches a `--port P` server: {P: "host:port"}.

    With its own network the pod listens on P at its IP; on the host network `--port`
    moves to a free loopback port (in place), so that replicas do not collide.
    """
    if "--port" not in argv[:-1]:
        return {}
    at = argv.index("--port") + 1
    declared = argv[at]
    if pod_ip is not None:
        return {declared: f"{pod_ip}:{declared}"}
    port = free_port()
    argv[at] = str(port)
    return {declared: f"127.0.0.1:{port}"}


def _hostname(pod: dict[str, Any]) -> str:
    return pod["spec"].get("hostname") or pod["metadata"]["name"]


def _rewrite(value: str, mounts: dict[str, Path]) -> str:
    for mount_path in sorted(mounts, key=len, reverse=True):
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return str(mounts[mount_path]) + value[len(mount_path.rstrip("/")):]
        if f"={mount_path}" in value:  # --flag=/mount/path
            return value.replace(f"={mount_path}", f"={mounts[mount_path]}", 1)
    return value


def _field_path(pod: dict[str, Any], path: str) -> str | None:
    """Resolve a downward-API fieldPath such as metadata.annotations['a/b']."""
    if path.startswith("metadata.annotations[") or path.startswith("metadata.labels["):
        section, key = path.split("[", 1)
        return pod["metadata"].get(section.split(".")[1], {}).get(key.strip("]'\""))
    simple = {"metadata.name": pod["metadata"]["name"], "metadata.namespace": pod["metadata"]["namespace"],
              "metadata.uid": pod["metadata"]["uid"], "spec.nodeName": pod["spec"].get("nodeName"),
              "spec.serviceAccountName": pod["spec"].get("serviceAccountName")}
    return simple.get(path)
