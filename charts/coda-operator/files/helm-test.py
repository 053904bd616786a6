"""`helm test`: with the operator's ServiceAccount, is the CodaTrainingRun API served and readable,
and (metrics on) does the operator answer on its metrics Service? Exit 0 when all hold, 1 with one
line per failed check. Standard library only (it runs in the operator image).

Environment: KUBERNETES_SERVICE_HOST/PORT (set in every pod), CODA_TEST_NAMESPACE (empty: list
cluster-wide), CODA_TEST_METRICS_URL (empty: skip), CODA_TEST_API and CODA_TEST_SA_DIR (overrides
for running it outside a pod, as the chart's tests do).
"""

import json
import os
import ssl
import sys
import urllib.error
import urllib.request

SA_DIR = os.environ.get("CODA_TEST_SA_DIR") or "/var/run/secrets/kubernetes.io/serviceaccount"
API = os.environ.get("CODA_TEST_API") or "https://{}:{}".format(
    os.environ.get("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc"),
    os.environ.get("KUBERNETES_SERVICE_PORT", "443"),
)
GROUP_VERSION, PLURAL = "coda.dev/v1alpha1", "codatrainingruns"


def get(url, token=None):
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", "Bearer " + token)
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context(cafile=os.path.join(SA_DIR, "ca.crt"))
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        return response.status, response.read().decode()


def main():
    with open(os.path.join(SA_DIR, "token")) as f:
        token = f.read().strip()
    failures = []
    try:
        _, body = get(f"{API}/apis/{GROUP_VERSION}", token)
        names = [r.get("name") for r in json.loads(body).get("resources") or []]
        if PLURAL not in names:
            failures.append(f"{GROUP_VERSION} is served without {PLURAL}")
    except (urllib.error.URLError, OSError, ValueError) as e:
        failures.append(f"{GROUP_VERSION} is not served (is the CRD installed?): {e}")
    namespace = os.environ.get("CODA_TEST_NAMESPACE", "")
    where = f"/namespaces/{namespace}" if namespace else ""
    try:
        get(f"{API}/apis/{GROUP_VERSION}{where}/{PLURAL}", token)
    except (urllib.error.URLError, OSError) as e:
        failures.append(f"the operator's ServiceAccount cannot list {PLURAL}{where}: {e}")
    metrics = os.environ.get("CODA_TEST_METRICS_URL", "")
    if metrics:
        try:
            _, text = get(metrics)
            if "coda_operator_" not in text:
                failures.append(f"{metrics} answers without coda_operator_ metrics")
        except (urllib.error.URLError, OSError) as e:
            failures.append(f"the operator does not answer on {metrics}: {e}")
    for failure in failures:
        print("FAIL", failure)
    if not failures:
        print(
            "ok: CodaTrainingRun API served and readable"
            + (", operator metrics up" if metrics else "")
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
