# kind targets. Included by the Makefile (-include mk/*.mk).
#   make kind-up kind-images kind-install kind-sample   # damops on kind: chart + its bundled PostgreSQL + a sample pool
#   make kind-e2e                                       # the e2e suite against it
#   make kind-down
# Two paths (docs/kubernetes.md, "kind"):
#   Docker (a laptop): docker, kind, kubectl and helm on PATH; images from the registries.
#   podman, offline (Linux, root, no Docker, no registry): the default where no Docker daemon
#     answers. kind, kubectl, helm, the node image (hack/kind-node-image), the damops base and the
#     PostgreSQL image (hack/kind-images) are built here from Go modules and Debian packages,
#     cached under ~/.cache/damops.
# docker when a Docker daemon answers (a docker client alone is not enough), else podman;
# asked only when a kind-* target runs
ifneq ($(filter kind-%,$(MAKECMDGOALS)),)
ifeq ($(origin DOCKER),undefined)
DOCKER := $(shell docker info >/dev/null 2>&1 && echo docker || echo podman)
endif
endif
KIND_PODMAN := $(filter podman,$(notdir $(DOCKER)))
# 1 = build everything locally (the podman path); empty = take it from the registries
KIND_OFFLINE ?= $(if $(KIND_PODMAN),1,)
KIND_CLUSTER ?= damops
KIND_CONFIG ?= kind-config.yaml
KIND_KUBECONFIG ?= $(HOME)/.kube/kind-$(KIND_CLUSTER)
KIND_NAMESPACE ?= damops
KIND_PG_PASSWORD ?= damops-e2e
KIND_PY ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
KIND_PYTEST_ARGS ?= -v
KIND_ARCHIVES ?= /tmp/damops-kind-$(KIND_CLUSTER)
DAMOPS_CACHE ?= $(HOME)/.cache/damops

ifneq ($(KIND_PODMAN),)
export KIND_EXPERIMENTAL_PROVIDER ?= podman
# root without CAP_SYS_RESOURCE: podman's default nofile rlimit fails (hack/kind/containers.conf)
export CONTAINERS_CONF ?= $(CURDIR)/hack/kind/containers.conf
# as hack/local-cluster builds: no network namespace or OCI runtime for RUN steps
KIND_BUILD_FLAGS ?= --layers --isolation chroot --network host
endif

ifeq ($(KIND_OFFLINE),1)
KIND ?= $(DAMOPS_CACHE)/tools/kind-v0.33.0/kind
KIND_NODE_IMAGE ?= localhost/damops-kind-node:v1.34.4
KIND_BASE_IMAGE ?= localhost/damops-base:bookworm
KIND_PG_IMAGE ?= localhost/damops-postgres:15
# kubectl and helm from hack/local-cluster's build (helm stamped with Kubernetes 1.34)
KIND_TOOLS_PATH ?= $(DAMOPS_CACHE)/kubernetes/v1.34.4:$(DAMOPS_CACHE)/helm/v3.19.5-kube1.34
else
KIND ?= kind
KIND_NODE_IMAGE ?=
KIND_BASE_IMAGE ?= docker.io/library/python:3.11.13-slim-bookworm
KIND_PG_IMAGE ?= docker.io/library/postgres:16-alpine
KIND_TOOLS_PATH ?=
endif
KIND_BUILD_FLAGS ?=
KIND_ENV = KUBECONFIG=$(KIND_KUBECONFIG) PATH=$(if $(KIND_TOOLS_PATH),$(KIND_TOOLS_PATH):)$$PATH
# The bundled PostgreSQL: pods reach it by its Service name (CoreDNS), the host through a
# NodePort that kind-config.yaml maps to 127.0.0.1:55433. The e2e suite gets its own database.
KIND_PG_POD_URL ?= postgresql://damops:$(KIND_PG_PASSWORD)@damops-postgresql.$(KIND_NAMESPACE).svc:5432
KIND_PG_HOST_URL ?= postgresql://damops:$(KIND_PG_PASSWORD)@127.0.0.1:55433
KIND_E2E_DB ?= damops_e2e

.PHONY: kind-tools kind-up kind-images kind-install kind-sample kind-e2e kind-down

kind-tools:
ifeq ($(KIND_OFFLINE),1)
	hack/kind-node-image kind >/dev/null
	@test -x $(DAMOPS_CACHE)/kubernetes/v1.34.4/kubectl -a -x $(DAMOPS_CACHE)/helm/v3.19.5-kube1.34/helm || hack/local-cluster build
else
	@for t in $(KIND) kubectl helm $(DOCKER); do command -v $$t >/dev/null || { echo "$$t is not installed (see docs/kubernetes.md, kind)"; exit 1; }; done
endif

kind-up: kind-tools
ifeq ($(KIND_OFFLINE),1)
	hack/kind-node-image >/dev/null
	@# kind always mounts /lib/modules; some hosts have none
	@test -d /lib/modules || mkdir -p /lib/modules
endif
	$(KIND) get clusters 2>/dev/null | grep -qx $(KIND_CLUSTER) || $(KIND) create cluster --name $(KIND_CLUSTER) \
	  --config $(KIND_CONFIG) --kubeconfig $(KIND_KUBECONFIG) $(if $(KIND_NODE_IMAGE),--image $(KIND_NODE_IMAGE)) --wait 180s
	@echo "export KUBECONFIG=$(KIND_KUBECONFIG)"

# One archive per image (docker save and podman save both write docker-archive), then kind load.
kind-images:
	@mkdir -p $(KIND_ARCHIVES)
ifeq ($(KIND_OFFLINE),1)
	hack/kind-images base >/dev/null
endif
	$(DOCKER) build $(KIND_BUILD_FLAGS) --build-arg BASE_IMAGE=$(KIND_BASE_IMAGE) -f worker_image/Dockerfile.worker -t localhost/damops-worker:dev .
	$(DOCKER) build $(KIND_BUILD_FLAGS) --build-arg BASE_IMAGE=$(KIND_BASE_IMAGE) -f worker_image/Dockerfile.operator -t localhost/damops-operator:dev .
	for i in worker operator; do rm -f $(KIND_ARCHIVES)/$$i.tar; $(DOCKER) save -o $(KIND_ARCHIVES)/$$i.tar localhost/damops-$$i:dev || exit 1; \
	  $(KIND) load image-archive --name $(KIND_CLUSTER) $(KIND_ARCHIVES)/$$i.tar || exit 1; done

kind-install:
ifeq ($(KIND_OFFLINE),1)
	$(KIND) load image-archive --name $(KIND_CLUSTER) $$(hack/kind-images postgres)
endif
	@# watchNamespaces: this operator leaves the e2e suite's namespaces to the suite's own operators
	$(KIND_ENV) helm upgrade --install damops helm/damops --namespace $(KIND_NAMESPACE) --create-namespace \
	  --set database.postgresql.enabled=true --set database.postgresql.password=$(KIND_PG_PASSWORD) \
	  --set database.postgresql.image=$(KIND_PG_IMAGE) --set database.postgresql.pullPolicy=IfNotPresent \
	  --set image.operator.repository=localhost/damops-operator --set image.operator.tag=dev --set image.operator.pullPolicy=Never \
	  --set image.worker.repository=localhost/damops-worker --set image.worker.tag=dev \
	  --set 'operator.watchNamespaces={$(KIND_NAMESPACE)}' --wait --timeout 300s
	$(KIND_ENV) kubectl -n $(KIND_NAMESPACE) apply -f hack/kind/postgresql-nodeport.yaml

kind-sample:
	$(KIND_ENV) kubectl -n $(KIND_NAMESPACE) apply -f helm/damops/examples/workerpool.yaml
	$(KIND_ENV) kubectl -n $(KIND_NAMESPACE) wait workerpool/default --for=condition=Ready --timeout=240s
	$(KIND_ENV) kubectl -n $(KIND_NAMESPACE) get workerpools

kind-e2e:
	$(KIND_PY) -c "import psycopg, sys; c = psycopg.connect(sys.argv[1] + '/damops', autocommit=True); \
	  c.execute('SELECT 1 FROM pg_database WHERE datname = %s', (sys.argv[2],)).fetchone() or c.execute('CREATE DATABASE ' + sys.argv[2])" \
	  $(KIND_PG_HOST_URL) $(KIND_E2E_DB)
	$(KIND_ENV) DAMOPS_E2E_DATABASE_URL=$(KIND_PG_HOST_URL)/$(KIND_E2E_DB) DAMOPS_E2E_POD_DATABASE_URL=$(KIND_PG_POD_URL)/$(KIND_E2E_DB) \
	  DAMOPS_E2E_PULL_POLICY=Never $(KIND_PY) -m pytest tests/e2e $(KIND_PYTEST_ARGS)

kind-down:
	-$(KIND) delete cluster --name $(KIND_CLUSTER) --kubeconfig $(KIND_KUBECONFIG)
	rm -rf $(KIND_ARCHIVES)
