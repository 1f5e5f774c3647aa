#!/bin/sh
# Starts the WebUI of docker/webui.Dockerfile: everything installed at build time (no git or pip at start-up), data
# in /data, listening on all interfaces at $WEBUI_PORT with the API on. Arguments are passed on to the WebUI.
set -e
mkdir -p /data/config_states  # /opt/webui/config_states links here; /data may be a fresh, empty volume
exec python launch.py --skip-prepare-environment --listen --port "${WEBUI_PORT:-7860}" --api --data-dir /data "$@"
