#!/bin/sh
# A service program in the style of the C project's dvs_lb scripts:
#   run_latency_bg.sh <dcid> <svr_ep> <clt_node> <clt_ep>
# binds the client endpoint, starts the server in the background, waits for its bind (the C
# scripts run wait4bind; here at most 5 s) and exits: the server is what runs for the session.
PY="${DSP_TEST_PYTHON:-python3}"
"$PY" -m dvs_apps.dvsctl rmtbind "$1" "$4" "$3" "clt_$3_$1_$4" > /dev/null 2>&1
"$PY" -m dvs_apps.latency server "$1" "$2" > /dev/null 2>&1 &
tries=0
until "$PY" -m dvs_apps.dvsctl procinfo "$1" "$2" 2>/dev/null | grep -q '^p_name=latency_server$'
do
    tries=$((tries + 1))
    [ "$tries" -ge 50 ] && exit 1
    sleep 0.1
done
exit 0
