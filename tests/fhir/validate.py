"""FHIR R4 validation of what the facade produces, with ``fhir.resources`` 6.4 (FHIR 4.0.1).

fhir.resources 6.4.0 is the last release whose default models are R4 itself (4.0.1);
7.x and 8.x default to R5 and carry R4B (4.3.0), not R4. Its models check types,
cardinalities, required elements, choice types and the primitive formats (id, instant,
dateTime, decimal, uri), and reject unknown elements. They do not check required
value-set bindings, so the few codes this server emits under one are checked here.
"""

from __future__ import annotations

from typing import Any

from fhir.resources import get_fhir_model_class

__all__ = ["validate"]

# required bindings of R4 for the coded elements this server emits
REQUIRED = {
    ("Observation", "status"): {"registered", "preliminary", "final", "amended", "corrected", "cancelled",
                                "entered-in-error", "unknown"},
    ("Device", "status"): {"active", "inactive", "entered-in-error", "unknown"},
    ("Bundle", "type"): {"document", "message", "transaction", "transaction-response", "batch", "batch-response",
                         "history", "searchset", "collection"},
    ("CapabilityStatement", "status"): {"draft", "active", "retired", "unknown"},
    ("CapabilityStatement", "kind"): {"instance", "capability", "requirements"},
}


def validate(resource: dict[str, Any]) -> Any:  # noqa: ANN401
    """Parse ``resource`` with its R4 model (raises on anything invalid) and check the
    serialization round-trips; returns the model."""
    model = get_fhir_model_class(resource["resourceType"]).parse_obj(resource)
    assert model.resource_type == resource["resourceType"]
    for (kind, name), codes in REQUIRED.items():
        if kind == resource["resourceType"] and name in resource:
            assert resource[name] in codes, f"{kind}.{name}: {resource[name]!r} is not in its required value set"
    if resource["resourceType"] == "Bundle":
        for e in resource.get("entry", []):
            validate(e["resource"])
    return model
