#!/bin/sh
# Submit a RayJob template and wait for its end: what the CronJobs of cronjobs.yaml run, and what an
# operator runs by hand to re-run a night or a week (with kubectl pointed at the cluster).
#
#   [RUN_DATE=YYYY-MM-DD] infra/k8s/submit-rayjob.sh infra/k8s/rayjob-retag.yaml
#
# Fills ${RUN_DATE} in the template (default: today in UTC), creates the RayJob (`kubectl create`: the
# template's generateName gives every submission its own name), then waits until KubeRay says Complete or
# Failed. Waiting makes the CronJob's Job last as long as the RayJob, so `concurrencyPolicy: Forbid` keeps
# two runs from overlapping. Exits 0 only when the Ray job SUCCEEDED.
set -eu

template=${1:?usage: submit-rayjob.sh RAYJOB_TEMPLATE.yaml}
RUN_DATE=${RUN_DATE:-$(date -u +%Y-%m-%d)}
POLL_SECONDS=${POLL_SECONDS:-30}

case "$RUN_DATE" in
  [0-9][0-9][0-9][0-9]-[0-1][0-9]-[0-3][0-9]) ;;
  *) echo "submit-rayjob: RUN_DATE must be YYYY-MM-DD, got '$RUN_DATE'" >&2; exit 2 ;;
esac

rendered=$(sed "s/\${RUN_DATE}/$RUN_DATE/g" "$template")
case "$rendered" in
  *'${'*) echo "submit-rayjob: $template has placeholders other than \${RUN_DATE}" >&2; exit 2 ;;
esac

created=$(printf '%s\n' "$rendered" | kubectl create -f - -o jsonpath='{.metadata.namespace} {.metadata.name}')
namespace=${created% *}
name=${created#* }
echo "submit-rayjob: created rayjob $name in namespace $namespace (run date $RUN_DATE)"

while :; do
  # a failed `kubectl get` (API server blip) is not the job's failure: ask again next time
  deployment=$(kubectl get rayjob "$name" -n "$namespace" -o jsonpath='{.status.jobDeploymentStatus}') ||
    deployment=unknown
  case "$deployment" in
    Complete | Failed)
      status=$(kubectl get rayjob "$name" -n "$namespace" -o jsonpath='{.status.jobStatus}') || status=unknown
      echo "submit-rayjob: rayjob $name is $deployment; Ray job $status"
      if [ "$status" = SUCCEEDED ]; then
        exit 0
      fi
      kubectl get rayjob "$name" -n "$namespace" -o jsonpath='{.status.reason}: {.status.message}{"\n"}' >&2 || true
      exit 1
      ;;
  esac
  sleep "$POLL_SECONDS"
done
