#!/bin/sh
# The tests' "hypervisor": starts the emulated server node an IMAGE file describes.
# usage: start_vm.sh IMAGE NODE_NAME NODE_ID   (the DSP's vm_start contract)
# IMAGE is a shell file setting PYTHON, PYTHONPATH, RUNDIR, CONFIG, LOGDIR and VMLOG.
set -e
. "$1"
export PYTHONPATH DVK_RUNDIR="$RUNDIR"
echo "start $2 $3" >> "$VMLOG"
"$PYTHON" -m dvs_apps.dvsctl node start "$3" > /dev/null
nohup "$PYTHON" -m dsp_proxy --dvk emu --node "$3" --status-file "$RUNDIR/dsp$3.json" \
    "$CONFIG" >> "$LOGDIR/vm-dsp$3.log" 2>&1 < /dev/null &
echo $! > "$RUNDIR/vm$3.pid"
DVK_NODE="$3" nohup "$PYTHON" -m dvs_apps.latency server 0 10 \
    >> "$LOGDIR/vm-latency$3.log" 2>&1 < /dev/null &
echo $! >> "$RUNDIR/vm$3.pid"
