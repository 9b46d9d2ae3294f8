"""DVS programs that speak M3-IPC through the DVK interface, as the C test programs do.

- `dvs_apps.latency`: `latency_server <dcid> <ep>` / `latency_client <dcid> <clt_ep> <svr_ep>
  <loops> [<secs> <cpu_secs>]` (round-trip times of sendrec, as the C test programs);
- `dvs_apps.m3ftp`: `m3ftpd <dcid> <srv_ep>` / `m3ftp {-p|-g} <dcid> <clt_ep> <srv_ep>
  <rmt_fname> <lcl_fname>` (file transfer through vcopy);
- `dvs_apps.dvsctl`: node kernels of the emulator, DVS/DC administration, bindings and the
  /proc/dvs views (`dvsctl --help`).

Every program opens its node's DVK with `open_dvk(DVK_MODE or "auto")`; under the emulator
`DVK_NODE` (node id) or `DVK_SOCKET` (path) chooses the node kernel (docs/emulator.md).
"""
