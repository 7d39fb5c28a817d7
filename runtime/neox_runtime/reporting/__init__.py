"""Reporters that carry the runtime's progress out of the pod (e.g. into the CR's status)."""
