#!/usr/bin/env bash
# Spread a NIC's queue interrupts over the cores coregate's workers run on.
#
#   scripts/pin-irqs.sh --iface IFACE --cores LIST [--dry-run]
#
# LIST is coregate's --cores syntax (0-3,6). Each interrupt of IFACE's
# queues (as named in /proc/interrupts: IFACE-TxRx-0, IFACE-rx-1,
# virtioN-input.0 for the virtio device behind IFACE ...) gets one core, in
# turn, so each worker's packets are handled on its own core. Stop
# irqbalance first or it undoes this. --dry-run prints the writes instead
# of doing them, and needs no root.
set -euo pipefail

IFACE="" CORES="" DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --iface) IFACE=$2; shift 2;;
    --cores) CORES=$2; shift 2;;
    --dry-run) DRY=1; shift;;
    -h|--help) sed -n 2,11p "$0"; exit 0;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2;;
  esac
done
[ -n "$IFACE" ] && [ -n "$CORES" ] || { echo "give --iface and --cores (see --help)" >&2; exit 2; }

# 0-3,6 -> 0 1 2 3 6
expand() {
  local part out=()
  IFS=',' read -ra parts <<< "$1"
  for part in "${parts[@]}"; do
    if [[ $part =~ ^([0-9]+)-([0-9]+)$ ]]; then
      for ((c = BASH_REMATCH[1]; c <= BASH_REMATCH[2]; c++)); do out+=("$c"); done
    elif [[ $part =~ ^[0-9]+$ ]]; then
      out+=("$part")
    else
      echo "--cores: $part is not a core or a range" >&2; exit 2
    fi
  done
  echo "${out[@]}"
}
list=$(expand "$CORES")  # a bad list ends the script here (set -e)
read -ra cores <<< "$list"

# The interrupt names to look for: the interface's own queues
# (IFACE-...), and for a virtio NIC the input/output queues of the virtio
# device it sits on (not its config interrupt).
names=("$IFACE")
pattern="[[:space:]]${IFACE}-"
if [ -e "/sys/class/net/$IFACE/device/driver" ] && [ "$(basename "$(readlink -f "/sys/class/net/$IFACE/device/driver")")" = virtio_net ]; then
  dev=$(basename "$(readlink -f "/sys/class/net/$IFACE/device")")
  names+=("$dev")
  pattern="($pattern|[[:space:]]${dev}-(input|output)\\.)"
fi
mapfile -t irqs < <(grep -E "$pattern" /proc/interrupts | awk -F: '{gsub(/ /, "", $1); print $1}' || true)

if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet irqbalance 2>/dev/null; then
  echo "warning: irqbalance is running and will move these interrupts again (systemctl stop irqbalance)" >&2
fi
if [ ${#irqs[@]} -eq 0 ]; then
  echo "no queue interrupts found for $IFACE in /proc/interrupts (looked for: ${names[*]}); nothing to do"
  exit 0
fi
i=0
for irq in "${irqs[@]}"; do
  core=${cores[$((i % ${#cores[@]}))]}
  if [ "$DRY" = 1 ]; then
    echo "+ echo $core > /proc/irq/$irq/smp_affinity_list"
  else
    echo "$core" > "/proc/irq/$irq/smp_affinity_list"
    echo "irq $irq -> core $core"
  fi
  i=$((i + 1))
done
