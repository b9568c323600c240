# Helpers for the benchmarks that run Debian's docker-registry (sourced, not run).

# registry_config FILE STORAGE NET ADDR: a quiet registry keeping its blobs under STORAGE and listening
# on ADDR (NET: tcp for host:port, unix for a socket path).
registry_config() {
    cat >"$1" <<YML
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $2
http:
  net: $3
  addr: $4
  secret: bench
YML
}

# wait_for_url URL [PREFIX...]: poll URL with curl (run under PREFIX, e.g. nsenter) until it answers, for at
# most 10 s (then the caller's next request fails and says why).
wait_for_url() {
    local url=$1
    shift
    for _ in $(seq 200); do
        "$@" curl -s -o /dev/null "$url" && return 0
        sleep 0.05
    done
}
