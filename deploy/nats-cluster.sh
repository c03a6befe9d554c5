#!/bin/sh
# One node of the NATS JetStream cluster (docker-compose.yml, deploy/k8s/): deploy/nats.conf (roles,
# JetStream, limits) plus this node's name and its routes to the others, written to a 0600 file at
# start so the route password is in neither an image, a committed file nor a command line.
#   NATS_SERVER_NAME              this node's unique, stable name (JetStream peers are named)
#   NATS_ROUTES                   host:port of every node's cluster listener, comma-separated
#   BUILDTEL_NATS_ROUTE_PASSWORD  shared by the nodes (routes authenticate as user "route")
#   NATS_CLUSTER_LISTEN           default 0.0.0.0:6222; NATS_BASE_CONF default /etc/nats/nats.conf
set -eu
: "${NATS_SERVER_NAME:?set NATS_SERVER_NAME (this node's unique name)}"
: "${NATS_ROUTES:?set NATS_ROUTES (host:port of every node's cluster listener, comma-separated)}"
: "${BUILDTEL_NATS_ROUTE_PASSWORD:?set BUILDTEL_NATS_ROUTE_PASSWORD (password of the cluster routes)}"
umask 077
conf="${NATS_CONF_OUT:-/tmp/nats.conf}"
routes=""
old_ifs=$IFS
IFS=,
for r in $NATS_ROUTES; do
  routes="$routes
    \"nats-route://route:${BUILDTEL_NATS_ROUTE_PASSWORD}@$r\""
done
IFS=$old_ifs
{
  cat "${NATS_BASE_CONF:-/etc/nats/nats.conf}"
  printf 'server_name: "%s"\n' "$NATS_SERVER_NAME"
  printf 'cluster {\n  name: "%s"\n  listen: "%s"\n' "${NATS_CLUSTER_NAME:-buildtel}" "${NATS_CLUSTER_LISTEN:-0.0.0.0:6222}"
  printf '  authorization { user: route, password: $BUILDTEL_NATS_ROUTE_PASSWORD }\n'
  printf '  routes: [%s\n  ]\n}\n' "$routes"
} > "$conf"
exec nats-server -c "$conf" "$@"
