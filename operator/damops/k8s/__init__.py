"""damops on Kubernetes: the WorkerPool custom resource and its kopf operator.

* :mod:`damops.k8s.models`   – pydantic models of WorkerPool spec/status (the one source of truth)
* :mod:`damops.k8s.crdgen`   – the CRD generated from those models (``python -m damops.k8s.crdgen``)
* :mod:`damops.k8s.specs`    – pure builders of Pod/Secret manifests
* :mod:`damops.k8s.reconcile` – pure reconcile decisions (desired vs actual pods → actions)
* :mod:`damops.k8s.handlers` – kopf handlers (imports kopf; registered on import)
* :mod:`damops.k8s.main`     – ``damops operator`` entry point
"""

GROUP = "damops.dev"
VERSION = "v1alpha1"
KIND = "WorkerPool"
PLURAL = "workerpools"
SINGULAR = "workerpool"
SHORT_NAMES = ["wp"]
API_VERSION = f"{GROUP}/{VERSION}"
