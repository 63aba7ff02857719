"""``vitalgate retention run [--dry-run]``: apply the retention horizons now, honouring legal holds.

The job is ``gateway.retention``'s, the same the gateway runs on its schedule; a run that
finds another one under way (any process, any host) does nothing and exits 1.
"""

from __future__ import annotations

import argparse
from typing import Any

from gateway.cli.common import Refused, add_config_option, connect, load_config, say
from gateway.cli.registry_common import _actor as cli_actor
from gateway.retention import HYPERTABLES, PLAIN_TABLES, Report, run

__all__ = ["add_parser", "format_report"]


def _ts(value: Any) -> str:  # noqa: ANN401 - a datetime
    return value.isoformat()


def format_report(report: Report) -> list[str]:
    """The lines ``retention run`` prints: per table its horizon, then each drop, move and delete."""
    verb = (lambda v: f"would {v}") if report.dry_run else (lambda v: v)
    lines = []
    p = report.plan
    for table in HYPERTABLES:
        horizon = p.horizons[table]
        chunks = [c for c in p.chunks if c.table == table]
        if horizon is None:
            lines.append(f"{table}: kept forever")
            continue
        lines.append(f"{table}: horizon {_ts(horizon)}, {len(chunks)} chunks past it")
        for c in chunks:
            lines.append(f"  {verb('drop')} chunk {c.qualified} [{_ts(c.start)}, {_ts(c.end)})")
            for hold_id, n in sorted(report.moved.get(c.qualified, {}).items()):
                lines.append(f"    {verb('move')} {n} rows to {table}_held (hold {hold_id})")
        held = f"{table}_held"
        for hold_id, n in sorted(report.held_adopted.get(held, {}).items()):
            lines.append(f"  {held}: {n} rows of released holds {verb('pass')} to hold {hold_id}")
        for hold_id, n in sorted(report.held_purged.get(held, {}).items()):
            lines.append(f"  {held}: {verb('delete')} {n} rows of released hold {hold_id}")
    for table in PLAIN_TABLES:
        horizon = p.horizons[table]
        if horizon is None:
            lines.append(f"{table}: kept forever")
        else:
            lines.append(f"{table}: horizon {_ts(horizon)}, {verb('delete')} {report.deleted.get(table, 0)} rows "
                         "(held rows kept)")
    if p.audit_cutoff is None:
        lines.append("audit_log: kept forever")
    else:
        lines.append(f"audit_log: horizon {_ts(p.audit_cutoff)}, {verb('delete')} {report.audit_pruned} rows")
    return lines


async def _run(args: argparse.Namespace) -> None:
    cfg = load_config(args)
    async with connect(cfg) as conn:
        report = await run(conn, cfg.retention, cli_actor(), dry_run=args.dry_run)
    if report is None:
        raise Refused("another retention run is under way (it holds the retention lock); nothing done")
    for line in format_report(report):
        print(line)
    say("Dry run: nothing changed." if args.dry_run else "Retention done; every change is in audit_log.")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:  # noqa: ANN401
    """Register ``retention`` (with its ``run`` action) on the top-level subparsers."""
    p = subparsers.add_parser("retention", help="drop data past its retention horizon, keeping held rows",
                              description="Retention of the [retention] configuration section.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    r = add_config_option(actions.add_parser(
        "run", help="apply the retention horizons now (--dry-run: only report)",
        description="Drop the chunks of readings and waveform_blocks whose range ends before their horizon "
        "(retention.<table>_days), after moving the rows legal holds keep to readings_held / waveform_blocks_held; "
        "delete older rows of ingests and rejected (held ones kept) and, if retention.audit_log_days is set, of "
        "audit_log beyond its floor. Prints each chunk with its range and the rows moved per hold. Runs whether or "
        "not retention.enabled is set (that flag schedules it in the gateway). Needs the tables' owner role.",
        epilog="exit status: 0 done; 1 another run is under way (nothing done); 2 invalid configuration, the "
        "database cannot be used, or a patient hold cannot be resolved (nothing dropped).",
    ))
    r.add_argument("--dry-run", action="store_true", help="report what would be dropped, moved and deleted; change nothing")
    r.set_defaults(func=_run, prog=r.prog)
    return p
