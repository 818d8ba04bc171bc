# edgebus as a container's PID 1.
#   docker build -t edgebus .
#   docker run --rm -it edgebus                       # root: services may switch users
#   docker run --rm -it --user 10001 edgebus          # the same, entirely non-root
# `edgebus boot` reaps zombies and forwards SIGTERM as an orderly shutdown, so no tini is
# needed; it exits 0 after a clean stop, 2 when a critical service gave up, 78 for a bad
# config (see README "Configuration").
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EDGEBUS_LOG_FORMAT=json

WORKDIR /opt/edgebus
COPY pyproject.toml setup.py README.md ./
COPY kernel kernel
COPY protocols protocols
COPY services services
COPY drivers drivers
COPY tools tools
# gcc only while pip builds protocols/_native.c (one multipart message per call); without
# it the install still succeeds and the bus falls back to pyzmq frame by frame.
RUN apt-get update -q && apt-get install -y -q --no-install-recommends gcc libc6-dev \
 && pip install --no-cache-dir . \
 && apt-get purge -y -q gcc libc6-dev && apt-get autoremove -y -q && rm -rf /var/lib/apt/lists/* \
 && (cd / && python -c "from protocols import transport; assert transport.NATIVE, 'protocols._native did not build'") \
 && (cd / && python -m drivers.accel --warm) \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/edgebus --shell /usr/sbin/nologin edgebus \
 && mkdir -p /run/edgebus /var/lib/edgebus \
 && chown edgebus:edgebus /run/edgebus /var/lib/edgebus \
 && chmod 0700 /run/edgebus /var/lib/edgebus

VOLUME ["/var/lib/edgebus"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["edgebus", "boot", "--run-dir", "/run/edgebus", "--state-dir", "/var/lib/edgebus"]
# Extra arguments go after the image name, e.g. `--config /etc/edgebus/system.toml`.
