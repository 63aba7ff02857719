# vitalgate gateway image. Build: docker build -t vitalgate .
# Run:  docker run --rm -e VITALGATE_DATABASE_URL=postgresql://... -e VITALGATE_MQTT_URL=mqtt://... vitalgate
# The database needs the TimescaleDB extension (the gateway runs CREATE EXTENSION itself).

# --- build: wheels for the package and all its dependencies
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . .
RUN pip wheel --wheel-dir /wheels .

# --- runtime: the installed package, profiles, a non-root user
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VITALGATE_PROFILES_DIR=/app/device_profiles \
    VITALGATE_METRICS_HOST=0.0.0.0
RUN groupadd --system --gid 10001 vitalgate \
 && useradd --system --uid 10001 --gid vitalgate --home-dir /app --no-create-home --shell /usr/sbin/nologin vitalgate
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links /wheels vitalgate && rm -rf /wheels
WORKDIR /app
COPY --chown=root:root device_profiles/ /app/device_profiles/
# The build fails if the runtime user could be root; the code and profiles stay root-owned (read-only to it).
RUN test "$(id -u vitalgate)" != 0 && test "$(id -g vitalgate)" != 0
USER vitalgate:vitalgate
# Prometheus metrics (worker i of --workers N: 9464 + i)
EXPOSE 9464
# `vitalgate health` GETs /healthz from the metrics listener (127.0.0.1:metrics_port), exit 0 or 1.
# With --workers N, override it with `vitalgate health --workers N` (deploy/compose.yaml does).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 CMD ["vitalgate", "health"]
# SIGTERM drains (shutdown_timeout_s, default 30 s): give `docker stop` a longer --time.
STOPSIGNAL SIGTERM
ENTRYPOINT ["vitalgate"]
CMD ["run"]
