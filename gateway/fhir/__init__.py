"""A FHIR R4 read facade over the stored readings, and the Observations the export writes.

Importing this package registers its routes under /fhir/r4/ in the HTTPS source's operation
table (so they are served and described in ``/openapi.json``) and its OperationOutcome
error format for that path. Modules: ``mapping`` (pure: rows to Observation, Device,
Provenance; ids), ``search`` (Observation search parameters), ``store`` (SQL over
``readings_all`` and ``waveform_blocks_all``), ``observations`` (a search's rows and
Observations, shared with ``vitalgate export fhir``), ``capability`` (the
CapabilityStatement, from the declared routes), ``types`` (outlines for OpenAPI),
``routes`` (the handlers).
"""

from __future__ import annotations

from . import routes  # noqa: F401 - importing registers the routes
