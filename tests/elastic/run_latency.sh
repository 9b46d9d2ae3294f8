#!/bin/sh
# A service program in the dvs_lb run_latency.sh style:
#   run_latency.sh <dcid> <svr_ep> <clt_node> <clt_ep>
# binds the client endpoint to the node the server reaches it through, then serves.
PY="${DSP_TEST_PYTHON:-python3}"
"$PY" -m dvs_apps.dvsctl rmtbind "$1" "$4" "$3" "clt_$3_$1_$4" > /dev/null 2>&1
exec "$PY" -m dvs_apps.latency server "$1" "$2"
