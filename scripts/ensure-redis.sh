#!/usr/bin/env bash
# Make sure a Redis server answers on 127.0.0.1:6379 (or LLMOS_TEST_REDIS_PORT, which the
# tests read too) for the tests of the Redis paths: the Redis task store, the shared work
# queue, several kernels. Uses one that is already
# running; otherwise starts redis-server (installing Debian's package if it is missing),
# daemonized, with the project's configuration (deploy/redis/redis.conf) and its files
# under .llmos/redis.
set -euo pipefail
port="${LLMOS_TEST_REDIS_PORT:-6379}"
cd "$(dirname "$0")/.."
if command -v redis-cli >/dev/null && redis-cli -h 127.0.0.1 -p ${port} ping >/dev/null 2>&1; then
    exit 0
fi
if ! command -v redis-server >/dev/null; then
    echo "== installing redis-server (Debian package)"
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq redis-server >/dev/null
fi
mkdir -p .llmos/redis
echo "== starting redis-server on 127.0.0.1:${port}"
redis-server deploy/redis/redis.conf --port ${port} --bind 127.0.0.1 --dir "$PWD/.llmos/redis" \
    --daemonize yes --logfile "$PWD/.llmos/redis/redis.log"
for _ in $(seq 50); do
    redis-cli -h 127.0.0.1 -p ${port} ping >/dev/null 2>&1 && exit 0
    sleep 0.1
done
echo "redis-server did not answer on 127.0.0.1:${port}; see .llmos/redis/redis.log" >&2
exit 1
