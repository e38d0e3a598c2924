"""Reach the apiserver from inside a pod through the in-cluster `kubernetes`
Service, the way kopf and the kubernetes client do (env + service-account token)."""

import json
import os
import ssl
import urllib.request

SA = "/var/run/secrets/kubernetes.io/serviceaccount"
host = os.environ["KUBERNETES_SERVICE_HOST"]
port = os.environ["KUBERNETES_SERVICE_PORT"]
token = open(f"{SA}/token").read().strip()
ctx = ssl.create_default_context(cafile=f"{SA}/ca.crt")
req = urllib.request.Request(f"https://{host}:{port}/version", headers={"Authorization": f"Bearer {token}"})
with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
    v = json.load(r)
req = urllib.request.Request(
    f"https://{host}:{port}/apis/authentication.k8s.io/v1/selfsubjectreviews",
    data=b'{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}',
    headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
)
with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
    who = json.load(r)["status"]["userInfo"]["username"]
print(f"apiserver {v['gitVersion']} at https://{host}:{port} (kubernetes Service), authenticated as {who}")
