"""The main job on the embedded default: control plane → operator → training → serving.

What `hack/demo` runs, end to end, on one machine without a GPU:
1. the local control plane (built on first use) with the CRDs installed;
2. a tiny corpus — the text of Python's own standard library documentation strings
   and sources — tokenized with a freshly trained BPE tokenizer by `neox-data` on Ray,
   into a PersistentVolumeClaim;
3. the operator, watching the `neox-demo` namespace;
4. `examples/training-tiny-cpu.yaml` applied: the operator creates the Job and its
   children, the pod runner starts the pod's `neox-train` as real processes (two
   DeepSpeed ranks on gloo), which report progress into the NeoXTraining's status and
   checkpoint into the claim; the training ends Succeeded;
5. the latest checkpoint converted to a Hugging Face directory (`neox-convert`) and
   served by `neox-serve`; one completion is requested through the OpenAI API.
The cluster stays up afterwards (`hack/cluster down` stops it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import yaml

from .cluster import LocalCluster
from .podrunner import PodRunner
from .provisioner import bound_path

REPO_ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "neox-demo"
TRAINING = REPO_ROOT / "examples" / "training-tiny-cpu.yaml"


def log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, text=True, capture_output=True, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def _wait(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_corpus(cluster: LocalCluster, claim: str) -> Path:
    """Fill a claim with a tokenizer and token shards made from Python's stdlib sources."""
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}}))
    root = claim_path(cluster, claim)
    if (root / "shards" / "manifest.json").exists():
        log(f"Corpus already prepared in {root}")
        return root
    corpus = root / "raw"
    corpus.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "argparse.py", "difflib.py", "pathlib.py", "inspect.py", "json/__init__.py",
                 "logging/__init__.py", "collections/__init__.py", "dataclasses.py", "typing.py"):
        shutil.copy(stdlib / name, corpus / name.replace("/", "_"))
    log(f"Training a BPE tokenizer on {len(list(corpus.iterdir()))} files of Python's standard library")
    _run(sys.executable, "-m", "neox_runtime.data.cli", "train-tokenizer", str(corpus),
         "--vocab-size", "512", "--output", str(root / "tokenizer.json"))
    log("Tokenizing into shards with Ray Data")
    _run(sys.executable, "-m", "neox_runtime.data.cli", "tokenize", str(corpus),
         "--tokenizer", str(root / "tokenizer.json"), "--output", str(root / "shards"), "--shards", "4",
         "--no-progress")
    shutil.copy(root / "tokenizer.json", root / "shards" / "tokenizer.json")
    return root


def start_operator(cluster: LocalCluster) -> subprocess.Popen:
    logs = cluster.state_dir / "logs" / "demo-operator.log"
    log(f"Starting the operator (log: {logs})")
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    with open(logs, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "neox_operator", "--namespace", NAMESPACE,
                                 "--metrics-port", "0", "--health-port", "0", "--resync-seconds", "5"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def train(cluster: LocalCluster) -> dict:
    manifest = yaml.safe_load(TRAINING.read_text())
    name = manifest["metadata"]["name"]
    cluster.kubectl("delete", "nxt", name, "-n", NAMESPACE, "--ignore-not-found", "--wait=true")
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(TRAINING))
    log(f"Applied {TRAINING.relative_to(REPO_ROOT)}; following `kubectl get nxt -n {NAMESPACE}`")
    last_line = ""

    def finished():
        nonlocal last_line
        table = cluster.kubectl("get", "nxt", name, "-n", NAMESPACE, check=False).stdout.strip()
        line = table.splitlines()[-1] if table else ""
        if line != last_line:
            print("   " + line, flush=True)
            last_line = line
        status = json.loads(cluster.kubectl("get", "nxt", name, "-n", NAMESPACE, "-o", "json").stdout).get("status", {})
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status = _wait(finished, 1200, "the training to finish", interval=2)
    if status["phase"] != "Succeeded":
        raise RuntimeError(f"training ended {status['phase']}: {json.dumps(status.get('conditions'), indent=1)}")
    return status


def claim_path(cluster: LocalCluster, claim: str) -> Path:
    return _wait(lambda: bound_path(cluster.kubectl, NAMESPACE, claim), 60, f"claim {claim} to bind")


def serve_and_ask(model_dir: Path) -> str:
    port = _free_port()
    log(f"Serving {model_dir} on http://127.0.0.1:{port}/v1")
    server = subprocess.Popen([sys.executable, "-m", "neox_runtime.serve.cli", "--model", str(model_dir),
                               "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny-cpu"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def ready():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        _wait(ready, 120, "the server to be ready")
        body = json.dumps({"model": "tiny-cpu", "prompt": "def main(", "max_tokens": 32, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        return answer["choices"][0]["text"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> int:
    started = time.monotonic()
    cluster = LocalCluster(log=log)
    cluster.up()
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO_ROOT / "crds"))
    cluster.kubectl("wait", "--for", "condition=Established", "crd/neoxtrainings.neox.dev", "--timeout", "60s")
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    prepare_corpus(cluster, "tiny-corpus")
    operator = start_operator(cluster)
    runner = PodRunner(kubectl=cluster.kubectl, namespace=NAMESPACE, selector="neox.dev/training",
                       state_dir=cluster.state_dir / "demo-pods", server=cluster.server(),
                       path_prefix=[str(Path(sys.executable).parent)], log=log).start()
    try:
        status = train(cluster)
    finally:
        runner.stop()
        operator.terminate()
        operator.wait(timeout=30)
    progress = status.get("progress", {})
    log(f"Training Succeeded: step {progress.get('stepDisplay')}, loss {progress.get('loss')}, "
        f"validation loss {progress.get('validationLoss')}, checkpoint step "
        f"{status.get('latestCheckpoint', {}).get('step')}")
    checkpoints = claim_path(cluster, "tiny-cpu-checkpoints")
    model_dir = cluster.state_dir / "demo-model"
    shutil.rmtree(model_dir, ignore_errors=True)
    _run(sys.executable, "-m", "neox_runtime.checkpoint.convert", "to-hf", str(checkpoints), str(model_dir),
         "--tokenizer", str(claim_path(cluster, "tiny-corpus") / "tokenizer.json"))
    log(f"Converted the latest checkpoint to a Hugging Face directory: {model_dir}")
    text = serve_and_ask(model_dir)
    log(f"Completion for 'def main(': {text!r}")
    log(f"Done in {time.monotonic() - started:.0f}s. Explore: eval \"$(hack/cluster env)\"; "
        f"kubectl get nxt -n {NAMESPACE}; stop with hack/cluster down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
