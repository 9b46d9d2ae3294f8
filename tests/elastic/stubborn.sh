#!/bin/sh
# A service program that ignores SIGTERM (only SIGKILL ends it): stopping it takes the
# whole grace period.  usage: stubborn.sh <dcid> <svr_ep> <clt_node> <clt_ep>
trap '' TERM
exec sleep 60
