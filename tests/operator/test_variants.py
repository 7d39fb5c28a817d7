"""Kueue and gang-scheduled variants: rendered as Kueue, Volcano and scheduler-plugins
expect them, and accepted by the real API server (which has none of those installed)."""

from __future__ import annotations

import json

import pytest
import yaml

from neox_operator import render
from neox_runtime.api import names
from neox_runtime.api.training import NeoXTrainingSpec
from tests.cluster.kube import wait_for

from .helpers import condition, condition_is, status, training, worker_pods

pytestmark = pytest.mark.cluster


def test_kueue_queue_creates_suspended_labelled_job_left_for_kueue(kube, namespace, operator):
    kube.apply(training("queued", scheduling={"queueName": "team-a"}), namespace)
    job = wait_for(lambda: kube.get("job", names.training_job("queued", 0), namespace), 30)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["suspend"] is True
    wait_for(lambda: condition_is(kube, namespace, "queued", "Created"), 30)
    assert condition(kube, namespace, "queued", "Running")["status"] == "False"
    assert not worker_pods(kube, namespace, "queued")
    # Kueue admits by unsuspending; the operator must not suspend it again.
    kube.kubectl("patch", "job", job["metadata"]["name"], "-n", namespace, "--type", "merge", "-p",
                 json.dumps({"spec": {"suspend": False}}))
    wait_for(lambda: len(worker_pods(kube, namespace, "queued")) == 2, 30, what="admitted pods")
    assert kube.get("job", job["metadata"]["name"], namespace)["spec"]["suspend"] is False


def test_volcano_gang_job_is_annotated_and_accepted(kube, namespace, operator):
    kube.apply(training("volc", scheduling={"gang": {"provider": "volcano"}}), namespace)
    job = wait_for(lambda: kube.get("job", names.training_job("volc", 0), namespace), 30)
    template = job["spec"]["template"]
    assert template["spec"]["schedulerName"] == "volcano"
    assert template["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "volc"
    assert template["metadata"]["annotations"]["volcano.sh/job-min-available"] == "2"


def test_coscheduling_renders_podgroup_and_job_is_accepted(kube, namespace, operator):
    manifest = training("gang", nodes=3, scheduling={"gang": {"provider": "coscheduling",
                                                              "scheduleTimeoutSeconds": 120}})
    kube.apply(manifest, namespace)
    created = wait_for(lambda: condition_is(kube, namespace, "gang", "Created", "False"), 30)
    assert created["reason"] == "DependencyMissing" and "podgroups" in created["message"]
    assert not worker_pods(kube, namespace, "gang")  # no half-gang without the PodGroup API

    uid = kube.get("neoxtraining", "gang", namespace)["metadata"]["uid"]
    owner = render.Owner("gang", namespace, uid)
    spec = NeoXTrainingSpec.model_validate(manifest["spec"])
    group = render.pod_group(owner, spec)
    assert group["spec"] == {"minMember": 3, "scheduleTimeoutSeconds": 120}
    job = render.job(owner, spec, 0)
    assert job["spec"]["template"]["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "gang"
    kube.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", input=yaml.safe_dump(job))
    assert status(kube, namespace, "gang")["phase"] == "Pending"
