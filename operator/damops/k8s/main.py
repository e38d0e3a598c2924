"""``damops operator``: run the kopf operator with the damops handlers.

    damops operator [--namespace NS ...] [--peering NAME | --standalone]
                    [--liveness URL] [--log-format plain|json|full] [--verbose]
                    [--no-operation-log]

With no ``--namespace`` it watches all namespaces (cluster-wide peering).
Environment: DATABASE_URL and the timing variables (see damops.config),
DAMOPS_WORKER_IMAGE, DAMOPS_WORKER_IMAGE_PULL_POLICY and DAMOPS_WORKER_ENV (defaults of WorkerPools),
DAMOPS_METRICS_PORT (9090), DAMOPS_WATCH_NAMESPACES (comma-separated, same as --namespace),
DAMOPS_TRACING and the OTEL_* variables (claim spans).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

from damops import tracing
from damops.logs import OPERATION_LOG
from damops.loop import event_loop

LOG_FORMATS = ("plain", "full", "json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="damops operator", description="Run the damops Kubernetes operator.")
    env_ns = [n for n in os.environ.get("DAMOPS_WATCH_NAMESPACES", "").split(",") if n.strip()]
    p.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=None,
        help="namespace to watch (repeatable; default all namespaces)",
    )
    p.add_argument(
        "--peering",
        default=os.environ.get("DAMOPS_PEERING", "damops"),
        help="kopf peering object name (guards against a second operator)",
    )
    p.add_argument(
        "--standalone",
        action="store_true",
        default=os.environ.get("DAMOPS_STANDALONE", "") in ("1", "true", "yes"),
        help="no peering (development only)",
    )
    p.add_argument(
        "--liveness",
        default=os.environ.get("DAMOPS_LIVENESS", "http://0.0.0.0:8080/healthz"),
        help="liveness endpoint URL ('' to disable)",
    )
    p.add_argument("--log-format", choices=LOG_FORMATS, default=os.environ.get("DAMOPS_LOG_FORMAT", "plain"))
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument(
        "--no-operation-log",
        dest="operation_log",
        action="store_false",
        help="no log line per finished operation run (logger damops.operations); warnings still show",
    )
    p.set_defaults(env_namespaces=env_ns)
    return p


def set_log_levels(*, verbose: bool, operation_log: bool) -> None:
    logging.getLogger("damops").setLevel(logging.DEBUG if verbose else logging.INFO)
    # NOTSET: the line per finished run follows "damops" unless turned off.
    logging.getLogger(OPERATION_LOG).setLevel(logging.NOTSET if operation_log else logging.WARNING)
    if not verbose:
        # kopf logs every handled pod event at INFO; keep its per-object chatter to warnings
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)


def check_configuration() -> None:
    """Stop start-up with one line (ConfigError) on a bad setting, naming the variable,
    and then without a reachable cluster: not a traceback every 60 s."""
    from kubernetes import config as kube_config

    from damops.config import ConfigError, load_settings
    from damops.k8s.specs import WorkerDefaults

    load_settings()
    WorkerDefaults.from_env(os.environ)
    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        try:
            kube_config.load_kube_config()
        except (kube_config.ConfigException, OSError) as exc:
            raise ConfigError(f"no Kubernetes cluster configured (in-cluster or KUBECONFIG): {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    import kopf

    check_configuration()
    logging.getLogger().handlers.clear()  # one handler, kopf's (plain or JSON), for every logger
    kopf.configure(
        verbose=args.verbose,
        log_format={"plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL, "json": kopf.LogFormat.JSON}[
            args.log_format
        ],
    )
    set_log_levels(verbose=args.verbose, operation_log=args.operation_log)
    # Here, not in the CLI: the chart's image runs `python -m damops.k8s.main`.
    tracing.configure("operator")
    import damops.k8s.handlers  # noqa: F401 - registers the handlers

    namespaces = args.namespace or args.env_namespaces
    # kopf.run() alone would use the standard loop (kopf picks uvloop only in its own
    # CLI); the scheduler's dispatch cycles run on this loop too.
    with event_loop() as loop:
        kopf.run(
            loop=loop,
            clusterwide=not namespaces,
            namespaces=namespaces or (),
            standalone=args.standalone,
            peering_name=None if args.standalone else args.peering,
            liveness_endpoint=args.liveness or None,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
