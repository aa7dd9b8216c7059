#!/usr/bin/env bash
# Make the consortium's CA and the coordinator's TLS server certificate with `fedslm certs`.
#
#   deploy/certs/make-certs.sh OUT NAME_OR_ADDRESS [NAME_OR_ADDRESS ...]
#   DAYS=730 deploy/certs/make-certs.sh pki coordinator.example.org 203.0.113.10
#
# Every argument after OUT becomes a subject alternative name: give every DNS name and IP
# address the sites dial. 127.0.0.1 is always added: the proxy and the admin commands reach
# the SuperLink over loopback, and `fedslm coordinator start` refuses a certificate without it.
# Validity: DAYS (default 365). Set FEDSLM to the fedslm program if it is not on PATH.
# Nothing is ever overwritten: to rotate, use a new OUT folder (see README.md).
set -euo pipefail

usage() {
  sed -n '4,5p' "$0" | sed 's/^#   //' >&2
  exit 2
}
[ "$#" -ge 2 ] || usage
out=$1
shift
fedslm=${FEDSLM:-fedslm}
days=${DAYS:-365}
case $days in
  '' | *[!0-9]*) echo "DAYS must be a whole number of days, got '$days'" >&2; exit 2 ;;
esac

hosts=()
have_loopback=no
for h in "$@"; do
  hosts+=(--host "$h")
  [ "$h" = 127.0.0.1 ] && have_loopback=yes
done
[ "$have_loopback" = yes ] || hosts+=(--host 127.0.0.1)

"$fedslm" certs "$out" "${hosts[@]}" --days "$days"

cat <<NEXT

Next:
  coordinator: $out/ca.crt, $out/server.pem, $out/server.key (tls.ca_cert, tls.cert, tls.key
               in coordinator.yaml; the key readable by the coordinator's user only)
  every site:  $out/ca.crt (daemon.ca_cert in its policy file)
  offline:     $out/ca.key (needed only to issue the next server certificate)
NEXT
