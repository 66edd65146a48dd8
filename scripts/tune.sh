#!/usr/bin/env bash
# Apply coregate's host tuning: sysctl/99-coregate.conf and open-file limits.
#
#   scripts/tune.sh [--dry-run] [--persist]
#
# Without --persist the sysctl values last until reboot (sysctl -w). With
# --persist the files are installed into /etc/sysctl.d/ and
# /etc/security/limits.d/ as well. --dry-run prints every command instead
# of running it, and needs no root. Also reports what cannot be tuned
# here: whether io_uring is allowed (kernel.io_uring_disabled) and the
# locked-memory limit io_uring rings count against.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0 PERSIST=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift;;
    --persist) PERSIST=1; shift;;
    -h|--help) sed -n 2,11p "$0"; exit 0;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2;;
  esac
done
run() { if [ "$DRY" = 1 ]; then echo "+ $*"; else "$@"; fi; }

SYSCTL_FILE=sysctl/99-coregate.conf
LIMITS_FILE=sysctl/limits.conf
[ -f "$SYSCTL_FILE" ] || { echo "missing $SYSCTL_FILE" >&2; exit 1; }
if [ "$DRY" = 0 ] && [ "$(id -u)" != 0 ]; then
  echo "tune.sh changes kernel settings: run it as root (or with --dry-run)" >&2
  exit 1
fi

echo "# sysctl settings from $SYSCTL_FILE"
# One key at a time, so a key this kernel lacks is reported, not fatal.
grep -E '^[a-z]' "$SYSCTL_FILE" | while IFS='=' read -r key value; do
  key=$(echo "$key" | xargs) value=$(echo "$value" | xargs)
  if [ ! -e "/proc/sys/${key//.//}" ]; then
    echo "  skip $key: not in this kernel"
    continue
  fi
  run sysctl -q -w "$key=$value" || echo "  could not set $key (a container?)"
done

if [ "$PERSIST" = 1 ]; then
  run install -m 0644 "$SYSCTL_FILE" /etc/sysctl.d/99-coregate.conf
  run install -m 0644 "$LIMITS_FILE" /etc/security/limits.d/coregate.conf
fi

echo "# open files"
echo "  this shell: soft $(ulimit -Sn), hard $(ulimit -Hn); coregate raises its soft limit to the hard one."
echo "  for more, see $LIMITS_FILE (or LimitNOFILE= in a systemd unit)."

echo "# io_uring"
if [ -r /proc/sys/kernel/io_uring_disabled ]; then
  case $(cat /proc/sys/kernel/io_uring_disabled) in
    0) echo "  allowed (kernel.io_uring_disabled = 0)";;
    1) echo "  only for the io_uring_group: coregate falls back to epoll otherwise";;
    *) echo "  disabled (kernel.io_uring_disabled = 2): coregate will run on epoll";;
  esac
else
  echo "  kernel.io_uring_disabled not present: allowed if the kernel has io_uring"
fi
echo "  locked memory limit: $(ulimit -l) KiB (rings are accounted against it on older kernels)"
