"""The local pod runner turns kwok pods into real processes with the pod's view of the world:
its env, volumes and ServiceAccount, and (as root) its own IP, hostname and cluster DNS."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from localcluster import podnet
from localcluster.podrunner import PodRunner
from localcluster.provisioner import claim_dir

from .kube import Kube, wait_for

SCRIPT = """
import os, pathlib, sys
index = int(os.environ["INDEX"])
config = pathlib.Path(os.environ["GREETING_FILE"]).read_text()
out = pathlib.Path(os.environ["OUT_DIR"]) / f"rank-{index}.txt"
out.write_text(f"{config} from {os.environ['POD_NAME']} master={os.environ['MASTER_ADDR']}")
sys.exit(0 if index == 0 else 3)
"""

# Each pod of a 2-pod Indexed Job: both listen on 29500 (their own port space), index 1
# connects to MASTER_ADDR (index 0's DNS name), index 0 records who connected, and both
# record what they see of themselves and whether the API server answers their token.
NETWORK_SCRIPT = """
import json, os, pathlib, socket, ssl, urllib.request
index = int(os.environ["INDEX"])
listener = socket.create_server(("0.0.0.0", 29500))
seen = {"hostname": socket.gethostname(), "resolved": socket.gethostbyname(socket.gethostname()),
        "pod_ip": os.environ["POD_IP"], "master": os.environ["MASTER_ADDR"], "port": os.environ["MASTER_PORT"]}
if index == 0:
    listener.settimeout(60)
    peer, address = listener.accept()
    seen["peer"] = address[0]
    peer.sendall(b"hello from 0")
else:
    seen["master_ip"] = socket.gethostbyname(os.environ["MASTER_ADDR"])
    with socket.create_connection((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])), timeout=60) as c:
        seen["reply"] = c.recv(100).decode()
config = json.loads(pathlib.Path(os.environ["KUBECONFIG"]).read_text())
context = ssl.create_default_context(); context.check_hostname = False; context.verify_mode = ssl.CERT_NONE
request = urllib.request.Request(config["clusters"][0]["cluster"]["server"] + "/version",
                                 headers={"Authorization": "Bearer " + config["users"][0]["user"]["token"]})
seen["api"] = json.loads(urllib.request.urlopen(request, context=context, timeout=30).read())["gitVersion"]
pathlib.Path(os.environ["OUT_DIR"], f"pod-{index}.json").write_text(json.dumps(seen))
"""


def _job(name: str, script: str, env: list[dict], subdomain: str | None = None) -> dict:
    pod_spec = {
        "restartPolicy": "Never",
        "containers": [{
            "name": "main", "image": "python", "command": [sys.executable, "-c", script],
            "env": [{"name": "INDEX", "valueFrom": {"fieldRef": {
                        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "OUT_DIR", "value": "/out"}, *env],
            "volumeMounts": [{"name": "config", "mountPath": "/etc/demo"}, {"name": "data", "mountPath": "/out"}],
        }],
        "volumes": [{"name": "config", "configMap": {"name": "demo"}},
                    {"name": "data", "persistentVolumeClaim": {"claimName": "demo-data"}}],
    }
    if subdomain:
        pod_spec["subdomain"] = subdomain
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": {
        "completions": 2, "parallelism": 2, "completionMode": "Indexed", "backoffLimit": 0,
        "template": {"metadata": {"labels": {"run-locally": "yes"}}, "spec": pod_spec}}}


def _volumes(kube: Kube, namespace: str) -> None:
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "demo"}, "data": {"greeting": "hello"}},
               namespace)
    kube.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "demo-data"},
                "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}}, namespace)


def _runner(kube: Kube, namespace: str, networking: str) -> PodRunner:
    cluster = kube.cluster
    return PodRunner(kubectl=cluster.kubectl, namespace=namespace, selector="run-locally=yes",
                     state_dir=cluster.state_dir / "podrunner", server=cluster.server(), log=lambda message: None,
                     networking=networking)


def _finished(kube: Kube, namespace: str):
    def both():
        pods = kube.pods(namespace, "run-locally=yes")
        done = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p
                for p in pods if p["status"].get("phase") in ("Succeeded", "Failed")}
        return done if len(done) == 2 else None
    return wait_for(both, timeout=90, what="both pods finished")


def test_pods_run_locally_and_report_exit_codes(kube: Kube, namespace: str):
    """On the host network (no root needed): env, volumes, exit codes; MASTER_ADDR moves to loopback."""
    _volumes(kube, namespace)
    kube.apply(_job("local", SCRIPT, [{"name": "MASTER_ADDR", "value": "local-0.workers.svc"},
                                      {"name": "GREETING_FILE", "value": "/etc/demo/greeting"}]), namespace)
    runner = _runner(kube, namespace, "host").start()
    try:
        pods = _finished(kube, namespace)
    finally:
        runner.stop()
    assert runner.networking == "host"
    assert pods["0"]["status"]["phase"] == "Succeeded"
    assert pods["1"]["status"]["phase"] == "Failed"
    assert pods["1"]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    # Both wrote into the claim's directory, which the provisioner bound to a real volume.
    data = claim_dir(kube.cluster.volumes_dir, namespace, "demo-data")
    text = (data / "rank-1.txt").read_text()
    assert text.startswith("hello from local-1-") and text.endswith("master=127.0.0.1")
    assert kube.get("pvc", "demo-data", namespace)["status"]["phase"] == "Bound"


def _leftovers(tag: str) -> list[str]:
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line for line in links.splitlines() if f"tag={tag}" in line] + \
           [line for line in namespaces.splitlines() if line.startswith(f"neox-{tag}-")]


@pytest.mark.skipif(podnet.unsupported_reason() is not None, reason=str(podnet.unsupported_reason()))
def test_each_pod_has_its_own_ip_hostname_and_dns_and_pods_meet_across_pod_ips(kube: Kube, namespace: str):
    _volumes(kube, namespace)
    kube.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "mesh-workers"}, "spec": {
        "clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"run-locally": "yes"},
        "ports": [{"name": "rendezvous", "port": 29500}]}}, namespace)
    kube.apply(_job("mesh", NETWORK_SCRIPT, [
        {"name": "MASTER_ADDR", "value": f"mesh-0.mesh-workers.{namespace}.svc"},
        {"name": "MASTER_PORT", "value": "29500"},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}], subdomain="mesh-workers"),
        namespace)
    runner = _runner(kube, namespace, "pod").start()
    try:
        pods = _finished(kube, namespace)
        tag = runner._network.tag
    finally:
        runner.stop()
    assert runner.networking == "pod"
    data = claim_dir(kube.cluster.volumes_dir, namespace, "demo-data")
    logs = {i: (kube.cluster.state_dir / "podrunner" / "pods" / f"{namespace}_{pods[i]['metadata']['name']}"
                / "container.log").read_text() for i in pods}
    assert all(p["status"]["phase"] == "Succeeded" for p in pods.values()), logs
    seen = {i: json.loads((data / f"pod-{i}.json").read_text()) for i in ("0", "1")}
    ips = {i: pods[i]["status"]["podIP"] for i in pods}
    assert ips["0"] != ips["1"]
    for i in ("0", "1"):
        # The kubelet's view: hostname = the Indexed Job's `<job>-<index>`, resolving to the pod's IP.
        assert seen[i]["hostname"] == f"mesh-{i}" and seen[i]["resolved"] == seen[i]["pod_ip"] == ips[i]
        # The rendered rendezvous is used as is: the node-0 pod's DNS name and port 29500.
        assert (seen[i]["master"], seen[i]["port"]) == (f"mesh-0.mesh-workers.{namespace}.svc", "29500")
        assert seen[i]["api"].startswith("v1.")  # the API server, through the pods' gateway
    assert seen["1"]["master_ip"] == ips["0"] and seen["1"]["reply"] == "hello from 0"
    assert seen["0"]["peer"] == ips["1"]  # across pod IPs, not loopback
    assert _leftovers(tag) == []  # namespaces, veths and the bridge went with the runner
    assert os.path.getsize("/etc/hosts") and "mesh-0" not in open("/etc/hosts").read()  # the host's file is untouched


KILLED_RUNNER = """
import sys, time
from pathlib import Path
from localcluster.podnet import PodNetwork
network = PodNetwork(apiserver_port=int(sys.argv[2])).start()
network.add("some-pod-uid", "10.244.250.1", "orphan-0", (), Path(sys.argv[1]))
print(network.tag, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(podnet.unsupported_reason() is not None, reason=str(podnet.unsupported_reason()))
def test_what_a_killed_runner_left_is_removed_by_the_next_one(tmp_path):
    from neox_runtime.launch import free_port

    hack = os.path.join(os.path.dirname(__file__), "..", "..", "hack")
    runner = subprocess.Popen([sys.executable, "-c", KILLED_RUNNER, str(tmp_path), str(free_port())],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": hack})
    tag = runner.stdout.readline().strip()
    runner.kill()  # no cleanup at all
    runner.wait()
    assert len(_leftovers(tag)) == 2  # its bridge and its pod's namespace
    podnet.remove_leftovers(log=lambda message: None)
    assert _leftovers(tag) == []


SERVE_HOSTNAME = """
import socket
with socket.create_server(("0.0.0.0", 8000)) as server:
    for _ in range(2):
        connection, _ = server.accept()
        connection.sendall((socket.gethostname() + " " + socket.gethostbyname("new-0.w.ns.svc")).encode())
        connection.close()
"""


def _ask(ip: str) -> str:
    def answer():
        with socket.create_connection((ip, 8000), timeout=5) as connection:
            return connection.recv(100).decode()
    return wait_for(answer, timeout=30, what=f"an answer at {ip}:8000")


@pytest.mark.skipif(podnet.unsupported_reason() is not None, reason=str(podnet.unsupported_reason()))
def test_the_ip_of_a_stopping_pod_goes_to_a_new_pod_without_breaking_it(tmp_path):
    """kwok reuses a deleted pod's IP at once: the stopping pod leaves the network for the new one."""
    from neox_runtime.launch import free_port

    network = podnet.PodNetwork(apiserver_port=free_port(), log=lambda message: None).start()
    try:
        for name in ("old", "new"):
            (tmp_path / name).mkdir()
        old = network.add("old-uid", "10.244.251.1", "old-0", podnet.dns_names("old-0", "w", "ns"), tmp_path / "old")
        network.detach(old)
        new = network.add("new-uid", "10.244.251.1", "new-0", podnet.dns_names("new-0", "w", "ns"), tmp_path / "new")
        server = subprocess.Popen(new.wrap([sys.executable, "-c", SERVE_HOSTNAME]))
        assert _ask("10.244.251.1") == "new-0 10.244.251.1"  # its hostname, its DNS record, its IP
        assert "old-0" not in new.hosts_file.read_text()
        # Two live pods given one IP by kwok: the second gets a spare one, from the top of the pod CIDR.
        assert network.spare_ip() == "10.244.255.254"
        twin = network.add("twin-uid", network.spare_ip(), "twin-0", (), tmp_path)
        assert network.spare_ip() == "10.244.255.253"
        network.remove(twin)
        network.remove(old)  # the old pod's processes are gone at last: the new pod's route stays
        assert _ask("10.244.251.1") == "new-0 10.244.251.1"
        assert server.wait(timeout=30) == 0
    finally:
        network.stop()
    assert _leftovers(network.tag) == []
