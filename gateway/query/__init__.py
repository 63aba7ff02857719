"""The read side's storage and live fan-out: what dashboards and clinical systems read.

Modules: ``associations`` (device-patient associations over time, the windows patient
reads use), ``store`` (SQL reads on a pool of their own), ``cursor`` (keyset pagination),
``hub`` (committed data as live events, per worker), ``peers`` (the hubs of other
workers), ``cli`` (``vitalgate associate``/``dissociate``). The HTTP handlers are in
``gateway.api``; the rollups are written by the sink (``gateway.sinks.rollups``).
"""
