"""What the pod would refuse is refused up front: by pydantic with the API server's words, and by
the operator as a condition for what got into the cluster anyway (created under an older CRD)."""

from __future__ import annotations

import copy
import itertools
from datetime import datetime, timedelta, timezone

import pytest

from neox_operator import serving
from neox_operator.diff import status_patch
from neox_operator.reconcile import Observed, reconcile
from neox_runtime.api import names
from neox_runtime.api.architecture import ModelArchitecture
from neox_runtime.api.layout import ParallelLayout
from neox_runtime.api.spec_rules import LAYOUT_RULES, claiming_rules
from neox_runtime.api.training import NeoXTrainingSpec
from tests.corpus import EXAMPLES, custom_resources

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


def _example(file_name: str) -> dict:
    return copy.deepcopy(custom_resources(next(p for p in EXAMPLES if p.name == file_name))[0])


def _stored(document: dict) -> dict:
    document["metadata"].update(namespace="ml", uid="u-1", generation=1)
    return document


def _training_observed(body: dict, now: datetime = NOW) -> Observed:
    return Observed(body=body, children={}, jobs=[], pods=[], node_ready={}, node_labels=[], now=now)


def _condition(status: dict, type_: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_every_problem_the_layout_finds_is_one_cel_rule():
    """A sweep of small shapes and layouts: each problem `ParallelLayout.problems` reports is
    claimed by exactly one of the CRD's layout rules, and every rule by some problem (so a
    reworded or new check in the layout fails here instead of passing the API server)."""
    used = set()
    for heads, width, vocab, layers in itertools.product((1, 4, 6), (6, 8), (9, 16), (1, 2, 3)):
        arch = ModelArchitecture(vocab_size=vocab, hidden_size=12 * heads, num_hidden_layers=layers,
                                 num_attention_heads=heads, intermediate_size=width, rotary_pct=0.25,
                                 max_position_embeddings=64)
        for tensor, pipeline, zero, seq in itertools.product((1, 2, 3), (1, 2, 4), range(4), (64, 65)):
            layout = ParallelLayout(world_size=tensor * pipeline, tensor=tensor, pipeline=pipeline)
            for problem in layout.problems(arch, zero_stage=zero, seq_length=seq):
                rules = claiming_rules(problem)
                assert len(rules) == 1, problem
                assert rules[0].message.startswith(problem.named("spec").split(":")[0])
                used.add(rules[0].message)
    assert used == {rule.message for rule in LAYOUT_RULES}


def test_a_zero_stage_hidden_in_the_deepspeed_overrides_is_refused():
    """CEL cannot read the free-form object; pydantic (and so the operator) refuses it by name."""
    document = _example("training-tiny-cpu.yaml")["spec"]
    document["parallelism"].update(processesPerNode=2, pipeline=2)
    document["training"]["globalBatchSize"] = 8
    document["deepspeed"] = {"zero_optimization": {"stage": 2}}
    with pytest.raises(ValueError, match=r"spec\.deepspeed\.zero_optimization\.stage: 2 differs from "
                                         r"spec\.training\.zeroStage \(1\)"):
        NeoXTrainingSpec.model_validate(document)
    document["deepspeed"] = {"zero_optimization": {"stage": 1, "reduce_bucket_size": 1000}}
    NeoXTrainingSpec.model_validate(document)  # the same stage, and other keys, are fine


@pytest.mark.parametrize("name,words", [("1abc", "must start with a lowercase letter"),
                                        ("tiny.cpu", "must not contain '.'"),
                                        ("Tiny", "must start with a lowercase letter"),
                                        ("x" * 41, "at most 40 characters")])
def test_name_problems_say_what_is_wrong(name, words):
    problems = names.name_problems(name, 40)
    assert problems and any(words in p for p in problems)
    assert all(p.startswith("metadata.name") for p in problems)


def test_good_names_have_no_problems():
    for name in ("a", "tiny-cpu", "a1-2b", "x" * 40):
        assert names.name_problems(name, 40) == []


@pytest.mark.parametrize("name", ["1abc", "tiny.cpu"])
def test_operator_marks_a_training_with_an_invalid_name_and_creates_nothing(name):
    """Stored under an older CRD, such a training used to fail on every Service create, status empty."""
    body = _stored(_example("training-tiny-cpu.yaml"))
    body["metadata"]["name"] = name
    first = reconcile(_training_observed(body))
    assert first.actions == []
    feasible, ready = _condition(first.status, "Feasible"), _condition(first.status, "Ready")
    assert (feasible["status"], feasible["reason"]) == ("False", "InvalidName")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidName")
    assert feasible["message"].startswith("metadata.name") and first.status["phase"] == "Invalid"
    assert [e[1] for e in first.events] == ["InvalidName"]
    body["status"] = first.status  # at rest: the next look writes nothing and says nothing again
    again = reconcile(_training_observed(body, NOW + timedelta(minutes=2)))
    assert again.actions == [] and again.events == [] and status_patch(again.status, body["status"]) == {}


def test_operator_marks_a_layout_the_crd_did_not_refuse_yet():
    """A pipeline deeper than the layers, stored before the rule existed: Feasible=False, field named."""
    body = _stored(_example("training-tiny-cpu.yaml"))
    body["spec"]["parallelism"].update(processesPerNode=4, pipeline=4)
    body["spec"]["training"]["globalBatchSize"] = 8
    decision = reconcile(_training_observed(body))
    feasible = _condition(decision.status, "Feasible")
    assert (feasible["status"], feasible["reason"]) == ("False", "InvalidSpec") and decision.actions == []
    assert feasible["message"] == "spec.parallelism.pipeline: 4 stages is more than the model's 2 layers"


@pytest.mark.parametrize("name", ["7b-chat", "chat.v2"])
def test_operator_marks_a_serving_with_an_invalid_name(name):
    body = _stored(_example("serving-from-volume.yaml"))
    body["metadata"]["name"] = name
    observed = serving.Observed(body=body, children={}, deployments=[], now=NOW)
    decision = serving.reconcile(observed)
    assert decision.actions == []
    ready = _condition(decision.status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidName")
    assert ready["message"].startswith("metadata.name")
