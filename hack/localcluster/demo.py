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
5. a NeoXServing of that training's latest checkpoint: the operator renders its
   Deployment, and the pod runner runs the pod's init container (`neox-convert`, the
   checkpoint to a Hugging Face directory) and then `neox-serve`; one completion is
   requested through the OpenAI API.
The cluster stays up afterwards (`hack/cluster down` stops it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import yaml

from .cluster import LocalCluster
from .podrunner import ADDRESSES_ANNOTATION, PodRunner
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



class Demo:
    """The steps of the demo in one namespace; the e2e test drives the same steps."""

    def __init__(self, cluster: LocalCluster, namespace: str = NAMESPACE) -> None:
        self.cluster, self.namespace = cluster, namespace

    def kubectl(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.cluster.kubectl(*args, **kwargs)

    def claim_path(self, claim: str) -> Path:
        return _wait(lambda: bound_path(self.kubectl, self.namespace, claim), 60, f"claim {claim} to bind")

    def prepare_corpus(self, claim: str = "tiny-corpus") -> Path:
        """Fill a claim with a tokenizer and token shards made from Python's stdlib sources."""
        self.kubectl("apply", "-n", self.namespace, "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}}))
        root = self.claim_path(claim)
        if (root / "shards" / "manifest.json").exists():
            log(f"Corpus already prepared in {root}")
            return root
        corpus = root / "raw"
        corpus.mkdir(parents=True, exist_ok=True)
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        for name in CORPUS_FILES:
            shutil.copy(stdlib / name, corpus / name.replace("/", "_"))
        log(f"Training a BPE tokenizer on {len(CORPUS_FILES)} files of Python's standard library")
        _run(sys.executable, "-m", "neox_runtime.data.cli", "train-tokenizer", str(corpus),
             "--vocab-size", "512", "--output", str(root / "tokenizer.json"))
        log("Tokenizing into shards with Ray Data")
        _run(sys.executable, "-m", "neox_runtime.data.cli", "tokenize", str(corpus),
             "--tokenizer", str(root / "tokenizer.json"), "--output", str(root / "shards"), "--shards", "4",
             "--no-progress")
        shutil.copy(root / "tokenizer.json", root / "shards" / "tokenizer.json")
        return root

    def start_operator(self) -> subprocess.Popen:
        logs = self.cluster.state_dir / "logs" / f"operator-{self.namespace}.log"
        log(f"Starting the operator (log: {logs})")
        env = {**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig)}
        with open(logs, "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "neox_operator", "--namespace", self.namespace,
                                     "--metrics-port", "0", "--health-port", "0", "--resync-seconds", "5"],
                                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def pod_runner(self) -> PodRunner:
        # Every pod the operator manages: training workers and serving replicas.
        return PodRunner(kubectl=self.kubectl, namespace=self.namespace,
                         selector="app.kubernetes.io/managed-by=neox-operator",
                         state_dir=self.cluster.state_dir / f"pods-{self.namespace}", server=self.cluster.server(),
                         path_prefix=[str(Path(sys.executable).parent)], log=log)

    def train(self, manifest: dict, timeout: float = 1200) -> dict:
        """Apply a NeoXTraining and follow it until it ends; return its status."""
        name = manifest["metadata"]["name"]
        self.kubectl("delete", "nxt", name, "-n", self.namespace, "--ignore-not-found", "--wait=true")
        self.kubectl("apply", "-n", self.namespace, "-f", "-", input=yaml.safe_dump(manifest))
        log(f"Applied NeoXTraining {name}; following `kubectl get nxt -n {self.namespace}`")
        last_line = ""

        def finished():
            nonlocal last_line
            table = self.kubectl("get", "nxt", name, "-n", self.namespace, check=False).stdout.strip()
            line = table.splitlines()[-1] if table else ""
            if line != last_line:
                print("   " + line, flush=True)
                last_line = line
            status = json.loads(self.kubectl("get", "nxt", name, "-n", self.namespace, "-o", "json").stdout
                                ).get("status", {})
            return status if status.get("phase") in ("Succeeded", "Failed") else None

        status = _wait(finished, timeout, "the training to finish", interval=2)
        if status["phase"] != "Succeeded":
            raise RuntimeError(f"training ended {status['phase']}: {json.dumps(status.get('conditions'), indent=1)}")
        return status

    def serve(self, training: str, timeout: float = 300) -> str:
        """Apply a NeoXServing of the training's checkpoint; return its replica's API URL once it answers."""
        manifest = serving_of(training)
        name = manifest["metadata"]["name"]
        # A fresh pod each run: the previous run's pod published a port nothing listens on any more.
        self.kubectl("delete", "nxs", name, "-n", self.namespace, "--ignore-not-found", "--cascade=foreground",
                     "--wait=true")
        self.kubectl("apply", "-n", self.namespace, "-f", "-", input=yaml.safe_dump(manifest))
        log(f"Applied NeoXServing {name}; the pod converts the checkpoint, then serves it")

        def published_address():
            out = self.kubectl("get", "pods", "-n", self.namespace, "-l", f"neox.dev/serving={name}", "-o", "json")
            for pod in json.loads(out.stdout)["items"]:
                if pod["metadata"].get("deletionTimestamp"):
                    continue
                addresses = json.loads(pod["metadata"].get("annotations", {}).get(ADDRESSES_ANNOTATION, "{}"))
                if "8000" in addresses:
                    return addresses["8000"]
            return None

        base_url = f"http://{_wait(published_address, 120, 'the serving pod to start')}/v1"
        wait_for_server(base_url, timeout)
        log(f"NeoXServing {name} answers on {base_url}")
        return base_url


CORPUS_FILES = ("textwrap.py", "argparse.py", "difflib.py", "pathlib.py", "inspect.py", "json/__init__.py",
                "logging/__init__.py", "collections/__init__.py", "dataclasses.py", "typing.py")


def serving_of(training: str) -> dict:
    """A NeoXServing of a training's latest checkpoint, one CPU replica."""
    return {"apiVersion": "neox.dev/v1alpha1", "kind": "NeoXServing", "metadata": {"name": f"{training}-chat"},
            "spec": {"model": {"fromTraining": {"name": training}, "servedName": training},
                     "runtime": {"device": "cpu", "dtype": "float32", "maxBatchSize": 8, "maxSequenceLength": 256,
                                 "maxNewTokens": 64},
                     "replicas": 1}}


def wait_for_server(base_url: str, timeout: float = 180) -> None:
    def ready():
        try:
            with urllib.request.urlopen(f"{base_url.removesuffix('/v1')}/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    _wait(ready, timeout, "the server to be ready")


def ask(base_url: str, model: str) -> str:
    body = json.dumps({"model": model, "prompt": "def main(", "max_tokens": 32, "temperature": 0}).encode()
    request = urllib.request.Request(f"{base_url}/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["choices"][0]["text"]


def main() -> int:
    started = time.monotonic()
    cluster = LocalCluster(log=log)
    cluster.up()
    cluster.install_crds(REPO_ROOT / "crds")
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    demo = Demo(cluster)
    demo.prepare_corpus()
    operator = demo.start_operator()
    runner = demo.pod_runner().start()
    try:
        status = demo.train(yaml.safe_load(TRAINING.read_text()))
        progress = status.get("progress", {})
        log(f"Training Succeeded: step {progress.get('stepDisplay')}, loss {progress.get('loss')}, "
            f"validation loss {progress.get('validationLoss')}, checkpoint step "
            f"{status.get('latestCheckpoint', {}).get('step')}")
        text = ask(demo.serve("tiny-cpu"), "tiny-cpu")
        log(f"Completion for 'def main(': {text!r}")
    finally:
        runner.stop()
        operator.terminate()
        operator.wait(timeout=30)
    log(f"Done in {time.monotonic() - started:.0f}s. Explore: eval \"$(hack/cluster env)\"; "
        f"kubectl get nxt,nxs -n {NAMESPACE}; stop with hack/cluster down")
    return 0

if __name__ == "__main__":
    sys.exit(main())
