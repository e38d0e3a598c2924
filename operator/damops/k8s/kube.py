"""The few Kubernetes API calls the operator makes, over the official sync client.

Every call runs in a worker thread (``asyncio.to_thread``) so kopf's event loop
never blocks, and is counted (``damops_api_requests_total{verb}``) so the cost of
a pool at steady state can be read off the metrics.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any

from damops.k8s import GROUP, PLURAL, VERSION, metrics


class Kube:
    def __init__(self) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self.api = client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.ApiException: type[Exception] = client.exceptions.ApiException

    async def call(self, verb: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        metrics.API_REQUESTS.labels(verb).inc()
        return await asyncio.to_thread(fn, *args, **kwargs)

    def status_of(self, exc: Exception) -> int | None:
        return getattr(exc, "status", None) if isinstance(exc, self.ApiException) else None

    async def create_pod(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = await self.call("create", self.core.create_namespaced_pod, namespace, body, _preload_content=False)
        created: dict[str, Any] = json.loads(resp.data)
        return created

    async def delete_pod(self, namespace: str, name: str, grace: int | None = None) -> None:
        try:
            await self.call("delete", self.core.delete_namespaced_pod, name, namespace, grace_period_seconds=grace)
        except self.ApiException as exc:
            if self.status_of(exc) != 404:
                raise

    async def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        body = {"metadata": {"annotations": annotations}}
        await self.call("patch", self.core.patch_namespaced_pod, name, namespace, body)

    async def read_secret_key(self, namespace: str, name: str, key: str) -> str | None:
        try:
            secret = await self.call("get", self.core.read_namespaced_secret, name, namespace)
        except self.ApiException as exc:
            if self.status_of(exc) == 404:
                return None
            raise
        data = (secret.data or {}).get(key)
        return base64.b64decode(data).decode() if data is not None else None

    async def create_secret(self, namespace: str, body: dict[str, Any]) -> None:
        try:
            await self.call("create", self.core.create_namespaced_secret, namespace, body)
        except self.ApiException as exc:
            if self.status_of(exc) != 409:
                raise

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self.call(
            "patch",
            self.custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": status},
        )
