#!/usr/bin/env bash
# Run a three-step jobrunner session on a throwaway kind cluster, every step a
# Job in the step image, the checkpoints in an in-cluster MinIO; then delete
# the cluster. Run it from anywhere; it needs docker, kind, kubectl and
# jobrunner (pip install -e . in the checkout) on PATH. On Linux only: the
# machine reaches the store at the kind node's address, which Docker Desktop
# does not route.
#
#   examples/kubernetes/kind-demo.sh            # cluster jobrunner-demo
#   KIND_CLUSTER=other KEEP_CLUSTER=1 examples/kubernetes/kind-demo.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cluster="${KIND_CLUSTER:-jobrunner-demo}"
image="jobrunner-step:dev"
namespace="jobrunner"
work="$(mktemp -d)"

cleanup() {
    if [[ -z "${KEEP_CLUSTER:-}" ]]; then
        kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

for tool in docker kind kubectl jobrunner python3; do
    command -v "$tool" >/dev/null || { echo "$tool is not on PATH" >&2; exit 1; }
done

echo "== creating the kind cluster $cluster"
kind create cluster --name "$cluster" --kubeconfig "$work/admin" --wait 120s
export KUBECONFIG="$work/admin"

echo "== building the step image and loading it into the cluster"
cd "$repo"
docker build -f Dockerfile.step -t jobrunner-step:dev .
kind load docker-image jobrunner-step:dev --name "$cluster"

echo "== namespace, RBAC, store Secret, NetworkPolicy, MinIO"
access_key="demo$(python3 -c 'import secrets; print(secrets.token_hex(8))')"
secret_key="$(python3 -c 'import secrets; print(secrets.token_hex(24))')"
signing_key="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
node_ip="$(docker inspect --format \
    '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' \
    "$cluster-control-plane")"
endpoint="http://$node_ip:30900"

kubectl apply -f "$here/namespace.yaml"
kubectl apply -f "$here/rbac.yaml"
sed -e "s|REPLACE_WITH_ACCESS_KEY_ID|$access_key|" \
    -e "s|REPLACE_WITH_SECRET_ACCESS_KEY|$secret_key|" \
    -e "s|REPLACE_WITH_ENDPOINT_URL|$endpoint|" \
    -e "s|REPLACE_WITH_SIGNING_KEY|$signing_key|" \
    "$here/store-secret.yaml" | kubectl apply -f -
kubectl apply -f "$here/networkpolicy.yaml"
kubectl apply -f "$here/minio.yaml"
kubectl -n "$namespace" rollout status deployment/minio --timeout 180s

echo "== creating the bucket at $endpoint"
export AWS_ACCESS_KEY_ID="$access_key" AWS_SECRET_ACCESS_KEY="$secret_key"
export JOBRUNNER_SIGNING_KEY="$signing_key"
for attempt in $(seq 30); do
    if python3 - "$endpoint" <<'PY'
import sys

import s3fs

s3fs.S3FileSystem(endpoint_url=sys.argv[1]).mkdir("jobrunner")
PY
    then
        break
    fi
    [[ "$attempt" -lt 30 ]] || { echo "MinIO never answered" >&2; exit 1; }
    sleep 2
done

echo "== a kubeconfig with the jobrunner-driver ServiceAccount's rights only"
kubectl config view --raw --minify >"$work/driver"
token="$(kubectl -n "$namespace" create token jobrunner-driver)"
kubectl --kubeconfig "$work/driver" config set-credentials jobrunner-driver \
    --token "$token" >/dev/null
kubectl --kubeconfig "$work/driver" config set-context --current \
    --user jobrunner-driver --namespace "$namespace" >/dev/null

step() {
    jobrunner run --backend kubernetes --image "$image" \
        --namespace "$namespace" --kubeconfig "$work/driver" \
        --env-secret jobrunner-store --memory 256Mi \
        --store s3://jobrunner/demo --store-option "endpoint_url=$endpoint" \
        --session demo "$1"
}

echo "== a three-step session, every step a Job"
step 'import math
r = 2'
step 'def area():
    return math.pi * r ** 2'
step 'print("radius", r)
area()'
