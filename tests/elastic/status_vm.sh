#!/bin/sh
# usage: status_vm.sh IMAGE NODE_NAME NODE_ID: exit 0 when running, 1 when stopped.
. "$1"
[ -f "$RUNDIR/vm$3.pid" ] && kill -0 $(head -n 1 "$RUNDIR/vm$3.pid") 2> /dev/null
