# Stand-in for the haproxy image where no registry is reachable: Debian's haproxy package, run as
# the upstream image runs it (master-worker, in the foreground, the configuration at
# /usr/local/etc/haproxy/haproxy.cfg, user haproxy), so that docker-compose.yml runs it unchanged.
ARG BASE
FROM ${BASE}
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /usr/local/etc/haproxy /var/lib/haproxy
USER haproxy
STOPSIGNAL SIGUSR1
CMD ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
