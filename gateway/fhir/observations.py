"""Observation searches, shared by the HTTP facade and ``vitalgate export fhir``: which rows to
read for a subject, codes and window, and the Observations they make, in order.

A patient's search reads each device associated with the patient within its own association
(``gateway.query.associations.windows``), so a device's readings before or after the patient
had it are never the patient's. A device's search reads the device and takes each
Observation's subject from the association open at the reading's time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from gateway.query.associations import list_associations, windows

from . import store
from .mapping import Catalog, ObsKey, coded, observation, patient_at

__all__ = ["Plan", "plan", "observations"]


@dataclass(frozen=True)
class Plan:
    subject: tuple[str, str]
    codes: Sequence[tuple[str | None, str]]
    search: store.Search
    associations: Sequence[Any]  # of the device, for a device's search

    @property
    def devices(self) -> list[str]:
        return sorted({w[0] for w in self.search.windows})


async def plan(conn: asyncpg.Connection, catalog: Catalog, subject: tuple[str, str],
               codes: Sequence[tuple[str | None, str]], frm: int, to: int, *, desc: bool = False) -> Plan:
    kind, value = subject
    if kind == "device":
        wins: list[tuple[str, int, int]] = [(value, frm, to)] if frm < to else []
        assocs: Sequence[Any] = await list_associations(conn, device_id=value)
    else:
        wins = await windows(conn, value, frm, to) if frm < to else []
        assocs = ()
    metrics: list[str] | None = None
    if codes:
        names: set[str] = set()
        for system, code in codes:
            found, panel = catalog.metrics_for(system, code)
            names |= found
            if panel:
                names.update(catalog.bp_metrics)
        metrics = sorted(names)
        if not metrics:
            wins = []  # no metric carries these codes: nothing to read
    return Plan(subject=subject, codes=list(codes), associations=assocs,
                search=store.Search(windows=wins, metrics=metrics, bp_metrics=catalog.bp_metrics, desc=desc))


async def observations(conn: asyncpg.Connection, catalog: Catalog, p: Plan, start: ObsKey | None = None
                       ) -> AsyncIterator[tuple[ObsKey, dict[str, Any]]]:
    """The Observations of ``p`` in order, from ``start`` on. Must run inside a transaction."""
    async for k, rows in store.stream(conn, p.search, start):
        if not coded(k, rows, catalog, p.codes):
            continue  # a metric of that name whose profile gives it other codes
        patient = p.subject[1] if p.subject[0] == "patient" else patient_at(p.associations, k.t)
        yield k, observation(k, rows, catalog, patient)
