"""The CapabilityStatement, built from the interactions the routes declare.

Every FHIR route is declared with ``interaction()``, which records what it implements
(resource type, interaction, search parameters) here and puts the same route in the HTTPS
source's operation table; ``statement()`` lists exactly what was recorded, so the
statement cannot promise a route, an interaction or a parameter the server does not have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from gateway import __version__

__all__ = ["FHIR_JSON", "BASE", "Interaction", "INTERACTIONS", "statement"]

FHIR_JSON = "application/fhir+json"
BASE = "/fhir/r4"


@dataclass(frozen=True)
class Interaction:
    resource: str | None  # None: a system-level interaction (capabilities)
    code: Literal["read", "search-type", "capabilities"]
    path: str
    params: dict[str, tuple[dict[str, Any], str, str]] = field(default_factory=dict)  # name -> (schema, type, doc)


INTERACTIONS: list[Interaction] = []


def statement(date: str) -> dict[str, Any]:
    """The CapabilityStatement of this server (``date``: when it was built, a FHIR dateTime)."""
    resources: dict[str, dict[str, Any]] = {}
    for i in INTERACTIONS:
        if i.resource is None:
            continue
        r = resources.setdefault(i.resource, {"type": i.resource, "interaction": []})
        r["interaction"].append({"code": i.code})
        if i.params:
            r.setdefault("searchParam", []).extend(
                {"name": n, "type": t, "documentation": doc} for n, (_, t, doc) in i.params.items())
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "publisher": "vitalgate",
        "kind": "instance",
        "software": {"name": "vitalgate", "version": __version__},
        "implementation": {"description": "vitalgate: device telemetry as FHIR R4 (read only)"},
        "fhirVersion": "4.0.1",
        "format": [FHIR_JSON, "json"],
        "rest": [{
            "mode": "server",
            "documentation": "Read only. Search results are in `searchset` Bundles of at most `_count` entries, "
                             "with a `next` link while more follow; `_sort` is `date` or `-date`.",
            "security": {"cors": False, "description": "Bearer API key (vgk_...) with scope telemetry:read; "
                                                       "every read of patient or device data is audited."},
            "resource": [resources[k] for k in sorted(resources)],
        }],
    }

