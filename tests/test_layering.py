"""The dependency direction of STYLE.md, checked on the code itself by walking imports."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "gateway"

# module prefix -> gateway modules it may import (prefix match); everything else inside gateway is forbidden
ALLOWED: dict[str, tuple[str, ...]] = {
    "gateway.checks": ("gateway.checks", "gateway.model", "gateway.profiles", "gateway.errors"),
    "gateway.rules": ("gateway.rules", "gateway.model", "gateway.profiles", "gateway.errors"),
    "gateway.decode": ("gateway.model", "gateway.profiles", "gateway.errors", "gateway.reasons"),
    "gateway.reasons": ("gateway.model",),
    "gateway.model": (),
    "gateway.errors": (),
    "gateway.metrics": (),
    "gateway.retry": (),
    "gateway.profiles": ("gateway.model", "gateway.errors"),
    "gateway.config": ("gateway.config", "gateway.model", "gateway.errors"),
    "gateway.registry": ("gateway.model", "gateway.errors", "gateway.config", "gateway.retry"),
    "gateway.registry_store": ("gateway.registry", "gateway.errors"),
    "gateway.registry_import": ("gateway.model",),
    "gateway.sources": ("gateway.sources", "gateway.model", "gateway.errors", "gateway.config", "gateway.metrics", "gateway.retry",
                        "gateway.registry"),
    "gateway.sinks": ("gateway.sinks", "gateway.model", "gateway.errors", "gateway.config", "gateway.metrics",
                      "gateway.retry", "gateway.decode", "gateway.hl7.outbox"),
    # the HL7 feed: messages and rendering pure, the outbox's SQL, the sender task
    "gateway.hl7": ("gateway.hl7", "gateway.model", "gateway.profiles", "gateway.config", "gateway.errors",
                    "gateway.metrics", "gateway.retry"),
    # cluster mode: the engine's API, membership and the commit fence; the NATS source uses them
    "gateway.cluster": ("gateway.cluster", "gateway.config", "gateway.model", "gateway.errors", "gateway.retry", "gateway.sinks",
                        "gateway.writepolicy"),
    "gateway.sources.nats": ("gateway.sources", "gateway.cluster", "gateway.model", "gateway.config",
                             "gateway.metrics", "gateway.retry", "gateway.errors"),
    "gateway.clock": (),
    "gateway.settings": ("gateway.checks", "gateway.config"),
    "gateway.evaluate": ("gateway.decode", "gateway.checks", "gateway.rules", "gateway.model", "gateway.profiles",
                         "gateway.errors"),
    # the rooms of the pipeline
    "gateway.identity": ("gateway.model", "gateway.errors", "gateway.registry"),
    "gateway.batching": ("gateway.clock", "gateway.decode", "gateway.evaluate", "gateway.model", "gateway.sinks"),
    "gateway.writepolicy": ("gateway.errors", "gateway.metrics", "gateway.model", "gateway.retry", "gateway.sinks"),
    "gateway.restore": ("gateway.decode", "gateway.errors", "gateway.evaluate", "gateway.model", "gateway.profiles",
                        "gateway.sinks"),
    "gateway.ticker": ("gateway.clock", "gateway.evaluate", "gateway.model"),
    "gateway.acks": ("gateway.batching", "gateway.clock", "gateway.evaluate", "gateway.metrics", "gateway.model",
                     "gateway.sinks"),
    "gateway.workers": ("gateway.workers", "gateway.model", "gateway.errors", "gateway.config", "gateway.metrics",
                        "gateway.retry", "gateway.pipeline", "gateway.sources"),
    "gateway.retention": ("gateway.config", "gateway.errors"),
    "gateway.holds_store": ("gateway.errors",),
    "gateway.logs": (),
    # liveness and readiness: reads facts the gateway hands it, through protocols
    "gateway.health": ("gateway.config", "gateway.errors", "gateway.sources"),
    # the read side: SQL reads and the live hub (query), served by the HTTPS source's operation table (api)
    "gateway.query": ("gateway.query", "gateway.model", "gateway.config", "gateway.errors", "gateway.retry"),
    "gateway.api": ("gateway.api", "gateway.query", "gateway.config", "gateway.model", "gateway.profiles",
                    "gateway.errors", "gateway.retry", "gateway.sources.http", "gateway.workers"),
    "gateway.ui": (),  # the page's static files; served by gateway.sources.http.ui
    # the FHIR facade: read side's rows as FHIR resources, served like the query API
    "gateway.fhir": ("gateway.fhir", "gateway.api", "gateway.query", "gateway.model", "gateway.profiles",
                     "gateway.errors", "gateway.retry", "gateway.sources.http"),
    "gateway.pipeline": ("gateway.decode", "gateway.checks", "gateway.model", "gateway.errors", "gateway.metrics",
                         "gateway.profiles", "gateway.sinks", "gateway.registry", "gateway.settings", "gateway.clock",
                         "gateway.evaluate", "gateway.identity", "gateway.batching", "gateway.writepolicy",
                         "gateway.restore", "gateway.ticker", "gateway.acks"),
}
PURE = ("gateway.checks", "gateway.rules", "gateway.evaluate", "gateway.registry_import", "gateway.reasons")
# I/O, clocks, randomness and the operating system: what would make a check's result depend on
# more than its input (and so make replay differ from live)
IMPURE_LIBS = (
    "asyncio", "asyncpg", "aiomqtt", "paho", "aiohttp", "uvloop", "prometheus_client", "logging",
    "time", "datetime", "random", "secrets", "uuid",
    "os", "sys", "io", "pathlib", "shutil", "tempfile", "glob", "socket", "ssl", "select", "selectors", "signal",
    "subprocess", "threading", "multiprocessing", "concurrent", "urllib", "http",
)


def modules() -> list[tuple[str, ast.Module]]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
            parts.append("__init__")  # a package's own module: relative imports resolve from the package
        out.append((".".join(parts), ast.parse(path.read_text(), str(path))))
    return _named(out)


def _named(found: list[tuple[str, ast.Module]]) -> list[tuple[str, ast.Module]]:
    """Module names as Python spells them (``gateway.checks``, not ``gateway.checks.__init__``),
    with each tree tagged with the package its relative imports start from."""
    out = []
    for dotted, tree in found:
        if dotted.endswith(".__init__"):
            name = dotted.removesuffix(".__init__")
            tree._package = name  # type: ignore[attr-defined]
        else:
            name = dotted
            tree._package = dotted.rsplit(".", 1)[0]  # type: ignore[attr-defined]
        out.append((name, tree))
    return out


def imports(tree: ast.Module) -> set[str]:
    """Every module a tree imports, relative imports resolved (``from .x import y`` counts)."""
    found: set[str] = set()
    package = getattr(tree, "_package", "")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


def rule_for(name: str) -> tuple[str, ...] | None:
    best = None
    for prefix in ALLOWED:
        if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    return None if best is None else ALLOWED[best]


def test_imports_follow_the_dependency_direction():
    bad = []
    for name, tree in modules():
        allowed = rule_for(name)
        if allowed is None:
            continue  # composition roots: cli (the package), app, replay, __main__
        for imp in imports(tree):
            if not imp.startswith("gateway.") or imp == "gateway":
                continue
            if not any(imp == a or imp.startswith(a + ".") for a in allowed):
                if imp.rsplit(".", 1)[0] in ("gateway",) and imp.split(".")[1] in ("__version__",):
                    continue
                bad.append(f"{name} imports {imp}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_checks_and_rules_are_pure():
    bad = []
    for name, tree in modules():
        if not name.startswith(PURE):
            continue
        for imp in imports(tree):
            if imp.split(".")[0] in IMPURE_LIBS:
                bad.append(f"{name} imports {imp}")
    assert not bad, "\n".join(bad)


def test_only_the_cli_chooses_the_event_loop():
    users = [name for name, tree in modules() if any(i.split(".")[0] == "uvloop" for i in imports(tree))]
    assert users == ["gateway.cli"]  # gateway/cli/__init__.py; no command module of the package either


def is_cli(name: str) -> bool:
    return name == "gateway.cli" or name.startswith("gateway.cli.")


def test_the_cli_is_a_leaf_only_main_imports():
    """The command modules may import anything in gateway; nothing in gateway imports them but __main__."""
    cli = [name for name, _ in modules() if is_cli(name)]
    assert {"gateway.cli", "gateway.cli.devices", "gateway.cli.keys", "gateway.cli.replay"} <= set(cli)
    importers = sorted({name for name, tree in modules() if not is_cli(name) and any(is_cli(i) for i in imports(tree))})
    assert importers == ["gateway.__main__"]


def test_sources_and_sinks_do_not_know_each_other():
    """A source hands payloads to the pipeline and a sink stores what it is given: only the
    composition root (app) wires one to the other, so either side can be replaced alone."""
    bad = []
    for name, tree in modules():
        for a, b in (("gateway.sources", "gateway.sinks"), ("gateway.sinks", "gateway.sources")):
            if name == a or name.startswith(a + "."):
                bad += [f"{name} imports {imp}" for imp in imports(tree) if imp == b or imp.startswith(b + ".")]
    assert not bad, "\n".join(sorted(set(bad)))


def test_every_module_has_a_rule_or_is_a_composition_root():
    """A new module must be placed in the dependency direction (ALLOWED) on purpose."""
    roots = {"gateway", "gateway.__main__", "gateway.app", "gateway.replay"}
    loose = [name for name, _ in modules() if rule_for(name) is None and not is_cli(name) and name not in roots]
    assert not loose, f"no layering rule for: {loose}"


def test_relative_imports_are_seen():
    tree = ast.parse("from .state import CheckState\nfrom ..model import Flag\n")
    tree._package = "gateway.checks"  # type: ignore[attr-defined]
    assert {"gateway.checks.state", "gateway.model", "gateway.model.Flag"} <= imports(tree)
