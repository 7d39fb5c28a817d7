"""The Argo CD health scripts in examples/gitops, run in a real Lua interpreter."""

from __future__ import annotations

import pytest
import yaml
from lupa import LuaRuntime

from tests.corpus import REPO_ROOT

SCRIPTS = yaml.safe_load((REPO_ROOT / "examples" / "gitops" / "argocd-health.yaml").read_text())["data"]


def health(kind: str, obj: dict) -> dict:
    lua = LuaRuntime(unpack_returned_tuples=True)

    def to_lua(value):
        if isinstance(value, dict):
            return lua.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([to_lua(v) for v in value])
        return value

    function = lua.eval(f"function(obj) {SCRIPTS[f'resource.customizations.health.neox.dev_{kind}']} end")
    result = function(to_lua(obj))
    return {"status": result["status"], "message": result["message"]}


def _training(generation=1, observed=1, **conditions) -> dict:
    return {"metadata": {"generation": generation}, "status": {
        "observedGeneration": observed,
        "conditions": [{"type": t, "status": s, "message": f"{t} is {s}"} for t, s in conditions.items()]}}


@pytest.mark.parametrize("obj,expected", [
    (_training(Failed="True", Ready="False"), "Degraded"),
    (_training(Feasible="False", Ready="False"), "Degraded"),
    (_training(Succeeded="True", Ready="True"), "Healthy"),
    (_training(Suspended="True", Ready="False"), "Suspended"),
    (_training(Restarting="True", Ready="False"), "Progressing"),
    (_training(Running="True", Ready="True"), "Healthy"),
    (_training(generation=2, observed=1, Ready="True"), "Progressing"),
    ({"metadata": {"generation": 1}}, "Progressing"),
])
def test_training_health(obj, expected):
    assert health("NeoXTraining", obj)["status"] == expected


def test_failed_training_message_names_the_failure():
    obj = _training(Failed="True")
    obj["status"]["conditions"][0]["message"] = "pod x-a3-1 (index 1) exited with code 137"
    assert health("NeoXTraining", obj) == {"status": "Degraded", "message": "pod x-a3-1 (index 1) exited with code 137"}


def _serving(ready: tuple[str, str], progressing: tuple[str, str], generation: int = 3, observed: int = 3):
    return {"metadata": {"generation": generation}, "status": {"observedGeneration": observed, "conditions": [
        {"type": "Ready", "status": ready[0], "reason": ready[1], "message": f"ready {ready[1]}"},
        {"type": "Progressing", "status": progressing[0], "reason": progressing[1], "message": "rolling"}]}}


@pytest.mark.parametrize("obj, expected", [
    (_serving(("True", "Available"), ("False", "Complete")), "Healthy"),
    (_serving(("True", "RollingOut"), ("True", "RollingOut")), "Progressing"),
    (_serving(("False", "NoReadyReplicas"), ("True", "RollingOut")), "Progressing"),
    (_serving(("False", "InvalidSpec"), ("False", "Complete")), "Degraded"),
    (_serving(("False", "NotImplemented"), ("False", "Complete")), "Degraded"),
    (_serving(("True", "Available"), ("False", "Complete"), generation=4), "Progressing"),
])
def test_serving_health(obj, expected):
    assert health("NeoXServing", obj)["status"] == expected
