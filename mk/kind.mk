# kind targets (Docker + kind on a laptop). Included by the Makefile (-include mk/*.mk).
#   make kind-up kind-images kind-install kind-sample   # a working damops on kind
#   make kind-e2e                                       # the e2e suite against it
#   make kind-down
KIND ?= kind
KIND_CLUSTER ?= damops
KIND_KUBECONFIG ?= $(HOME)/.kube/kind-$(KIND_CLUSTER)
DOCKER ?= docker
HELM ?= helm
KUBECTL ?= kubectl
KIND_NAMESPACE ?= damops
KIND_BASE_IMAGE ?= python:3.11-slim
KIND_PG_PASSWORD ?= damops-e2e
KIND_PY ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
# PostgreSQL for the e2e suite: a container on kind's Docker network, reached by
# pods at the container's name and by the host on a published port.
KIND_PG_HOST_URL ?= postgresql://damops:$(KIND_PG_PASSWORD)@127.0.0.1:55433/damops
KIND_PG_POD_URL ?= postgresql://damops:$(KIND_PG_PASSWORD)@damops-kind-postgres:5432/damops

.PHONY: kind-up kind-images kind-postgres kind-install kind-sample kind-e2e kind-down

kind-up:
	@command -v $(KIND) >/dev/null || { echo "kind is not installed (https://kind.sigs.k8s.io)"; exit 1; }
	$(KIND) get clusters | grep -qx $(KIND_CLUSTER) || $(KIND) create cluster --name $(KIND_CLUSTER) --config kind-config.yaml --kubeconfig $(KIND_KUBECONFIG)
	@echo "export KUBECONFIG=$(KIND_KUBECONFIG)"

kind-images:
	$(DOCKER) build --build-arg BASE_IMAGE=$(KIND_BASE_IMAGE) -f worker_image/Dockerfile.worker -t localhost/damops-worker:dev .
	$(DOCKER) build --build-arg BASE_IMAGE=$(KIND_BASE_IMAGE) -f worker_image/Dockerfile.operator -t localhost/damops-operator:dev .
	$(KIND) load docker-image --name $(KIND_CLUSTER) localhost/damops-worker:dev localhost/damops-operator:dev

kind-postgres:
	$(DOCKER) inspect damops-kind-postgres >/dev/null 2>&1 || $(DOCKER) run -d --name damops-kind-postgres --network kind \
	  -e POSTGRES_USER=damops -e POSTGRES_PASSWORD=$(KIND_PG_PASSWORD) -e POSTGRES_DB=damops -p 127.0.0.1:55433:5432 postgres:16-alpine
	@for i in $$(seq 30); do $(DOCKER) exec damops-kind-postgres pg_isready -U damops >/dev/null 2>&1 && exit 0; sleep 1; done; exit 1

kind-install: kind-postgres
	KUBECONFIG=$(KIND_KUBECONFIG) $(HELM) upgrade --install damops helm/damops --namespace $(KIND_NAMESPACE) --create-namespace \
	  --set database.url=$(KIND_PG_POD_URL) --set image.operator.pullPolicy=Never --wait

kind-sample:
	KUBECONFIG=$(KIND_KUBECONFIG) $(KUBECTL) -n $(KIND_NAMESPACE) apply -f helm/damops/examples/workerpool.yaml
	KUBECONFIG=$(KIND_KUBECONFIG) $(KUBECTL) -n $(KIND_NAMESPACE) wait workerpool/default --for=condition=Ready --timeout=180s
	KUBECONFIG=$(KIND_KUBECONFIG) $(KUBECTL) -n $(KIND_NAMESPACE) get workerpools

kind-e2e: kind-postgres
	KUBECONFIG=$(KIND_KUBECONFIG) DAMOPS_E2E_DATABASE_URL=$(KIND_PG_HOST_URL) DAMOPS_E2E_POD_DATABASE_URL=$(KIND_PG_POD_URL) \
	  DAMOPS_E2E_PULL_POLICY=Never $(KIND_PY) -m pytest tests/e2e -v

kind-down:
	-$(KIND) delete cluster --name $(KIND_CLUSTER)
	-$(DOCKER) rm -f damops-kind-postgres
