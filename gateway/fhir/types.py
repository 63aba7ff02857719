"""The FHIR resources' outlines for the OpenAPI document: the fields every answer carries.

The answers themselves are built as dicts by ``mapping`` and validated against the FHIR R4
models in the tests; these Structs only let ``/openapi.json`` say what comes back (their
schemas allow the other fields FHIR defines).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = ["FhirOperationOutcome", "FhirBundle", "FhirObservation", "FhirDevice", "FhirProvenance",
           "FhirCapabilityStatement"]


class FhirIssue(msgspec.Struct, kw_only=True, omit_defaults=True):
    severity: Literal["fatal", "error", "warning", "information"]
    code: str
    diagnostics: str | None = None


class FhirOperationOutcome(msgspec.Struct, kw_only=True):
    """Every error under /fhir/r4/: ``issue[0].diagnostics`` names the parameter at fault."""

    resourceType: Literal["OperationOutcome"]
    issue: list[FhirIssue]


class FhirObservation(msgspec.Struct, kw_only=True):
    resourceType: Literal["Observation"]
    id: str
    status: Literal["final"]
    code: dict[str, Any]
    effectiveDateTime: str
    device: dict[str, Any]


class FhirLink(msgspec.Struct, kw_only=True):
    relation: str
    url: str


class FhirEntry(msgspec.Struct, kw_only=True):
    fullUrl: str
    resource: FhirObservation
    search: dict[str, Any]


class FhirBundle(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A ``searchset``; ``link`` has ``self`` and, while more follow, ``next``."""

    resourceType: Literal["Bundle"]
    type: Literal["searchset"]
    link: list[FhirLink]
    entry: list[FhirEntry] = []


class FhirDevice(msgspec.Struct, kw_only=True):
    resourceType: Literal["Device"]
    id: str
    identifier: list[dict[str, Any]]
    status: Literal["active", "inactive", "unknown"]


class FhirProvenance(msgspec.Struct, kw_only=True):
    resourceType: Literal["Provenance"]
    id: str
    target: list[dict[str, Any]]
    recorded: str
    agent: list[dict[str, Any]]


class FhirCapabilityStatement(msgspec.Struct, kw_only=True):
    resourceType: Literal["CapabilityStatement"]
    status: str
    kind: Literal["instance"]
    fhirVersion: Literal["4.0.1"]
    format: list[str]
    rest: list[dict[str, Any]]
