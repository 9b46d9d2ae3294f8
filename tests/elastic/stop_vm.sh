#!/bin/sh
# usage: stop_vm.sh IMAGE NODE_NAME NODE_ID: stops what start_vm.sh started.
. "$1"
export PYTHONPATH DVK_RUNDIR="$RUNDIR"
echo "stop $2 $3" >> "$VMLOG"
if [ -f "$RUNDIR/vm$3.pid" ]; then
    kill $(cat "$RUNDIR/vm$3.pid") 2> /dev/null
    rm -f "$RUNDIR/vm$3.pid"
fi
"$PYTHON" -m dvs_apps.dvsctl node stop "$3" > /dev/null 2>&1
exit 0
