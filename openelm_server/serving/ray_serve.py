"""Many GPUs and machines behind one endpoint: the server as a Ray Serve application.

On a running Ray cluster (``ray start --head`` on one machine, ``ray start --address=...`` on
the others)::

    serve run openelm_server.serving.ray_serve:build_app model_path=/models/OpenELM-3B-Instruct \
        tokenizer_path=/models/Llama-2-7b-hf num_replicas=2

or the same arguments under ``args:`` in a Serve config file for ``serve deploy``. Ray Serve's
HTTP proxy (port 8000) then answers every route of ``api.py``. Each replica is one Ray actor
that runs one engine on one GPU (on CUDA); Ray routes each request to a replica with room,
scales the replica count on ongoing requests, and replaces replicas that die.

The arguments are ``api.py``'s settings, named as its flags with underscores
(``max_batch_size=16``, ``cuda_graphs=false``), plus the deployment's own (``DEPLOYMENT_ARGS``).
Environment variables do not apply here: the arguments are the whole configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import sys

from ray import serve
from ray.serve import Application

from openelm_server.config import Settings, build_parser, load_settings
from openelm_server.serving.app import create_app
from openelm_server.serving.middleware import RequestIdFilter
from openelm_server.serving.replica_id import new_replica_id
from openelm_server.startup import build_engine

DEPLOYMENT_NAME = "OpenELM"

# What Ray Serve does with the replicas, as opposed to what each replica's engine does
# (README, "More than one GPU", explains each).
DEPLOYMENT_ARGS = (
    "num_replicas",
    "min_replicas",
    "max_replicas",
    "target_ongoing_requests",
    "max_ongoing_requests",
    "max_queued_requests",
    "num_gpus",
)
AUTOSCALING_ARGS = ("min_replicas", "max_replicas", "target_ongoing_requests")
# Ray Serve's proxy owns the listening address, for all replicas together.
PROXY_SETTINGS = ("host", "port")
# api.py's on/off flags (--cuda-graphs / --no-cuda-graphs): true or false here. Read from its
# parser, which knows them whatever their type in Settings.
SWITCHES = {action.dest for action in build_parser()._actions if isinstance(action, argparse.BooleanOptionalAction)}
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
# Seconds a client is told to wait when Ray turns a request away, as our engine's own 503 says.
RETRY_AFTER_S = 1


class BuildArgsError(ValueError):
    """Arguments that do not make a valid application; the message names them."""


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class OpenELMReplica:
    """One replica: one engine and the same FastAPI app as ``python api.py``."""

    def __init__(self, settings: Settings):
        _configure_logging(settings.log_level)
        self.settings = settings
        self.engine, self.tokenizer = build_engine(settings)

    def __serve_build_asgi_app__(self):
        # Ray Serve's replica id (as in `serve status` and Ray's logs) ends the X-Replica-Id.
        ray_replica_id = serve.get_replica_context().replica_id.unique_id
        return create_app(self.settings, self.engine, self.tokenizer, replica_id=new_replica_id(ray_replica_id))


def build_app(args: dict) -> Application:
    """Ray Serve's application builder: ``args`` are the ``key=value`` pairs of ``serve run``
    (strings) or the ``args:`` of a Serve config file (YAML values)."""
    # `key: null` in a config file leaves that setting at its default, as leaving it out does.
    args = {name: value for name, value in args.items() if value is not None}
    setting_names = {field.name for field in dataclasses.fields(Settings)}
    unknown = sorted(set(args) - setting_names - set(DEPLOYMENT_ARGS))
    if unknown:
        raise BuildArgsError(
            f"unknown argument(s) {', '.join(unknown)}; known: api.py's settings "
            f"({', '.join(sorted(setting_names - set(PROXY_SETTINGS)))}) and "
            f"{', '.join(DEPLOYMENT_ARGS)}"
        )
    proxy_args = sorted(set(args) & set(PROXY_SETTINGS))
    if proxy_args:
        raise BuildArgsError(
            f"{', '.join(proxy_args)}: on Ray Serve the HTTP proxy listens for all replicas; "
            "set its address with `serve start --http-host ... --http-port ...` or http_options "
            "in the Serve config file"
        )
    settings = _settings_from({name: value for name, value in args.items() if name in setting_names})
    deployment = {name: value for name, value in args.items() if name in DEPLOYMENT_ARGS}
    num_gpus = _number(deployment, "num_gpus", float, 0 if settings.device == "cpu" else 1)
    if settings.device == "auto":
        # Ray hides the GPUs from a replica that did not ask for one, so a replica cannot pick
        # for itself: auto means a GPU per replica here, unless num_gpus=0 asks for none.
        settings = dataclasses.replace(settings, device="cuda" if num_gpus > 0 else "cpu")
    if settings.device.startswith("cuda:"):
        raise BuildArgsError(
            f"device={settings.device}: on Ray Serve each replica sees only the GPU Ray gives it; use device=cuda"
        )
    if settings.device == "cuda" and num_gpus <= 0:
        raise BuildArgsError(f"device=cuda needs num_gpus of at least 1, got {num_gpus:g}")
    if settings.device == "cpu" and num_gpus > 0:
        raise BuildArgsError(f"device=cpu with num_gpus={num_gpus:g} would hold GPUs that the replica never uses")

    options = dict(
        ray_actor_options={"num_gpus": num_gpus},
        max_ongoing_requests=_number(
            deployment, "max_ongoing_requests", int, settings.max_batch_size + settings.max_queue
        ),
        max_queued_requests=_number(deployment, "max_queued_requests", int, settings.max_queue),
        backpressure_config={"status_code": 503, "retry_after_s": RETRY_AFTER_S},
        # Ray's grace period for a replica being stopped, as --shutdown-timeout is for api.py.
        graceful_shutdown_timeout_s=settings.shutdown_timeout,
    )
    autoscaling = {name: deployment[name] for name in AUTOSCALING_ARGS if name in deployment}
    if autoscaling:
        if "num_replicas" in deployment:
            raise BuildArgsError(
                f"num_replicas fixes the replica count; it cannot go with autoscaling ({', '.join(autoscaling)})"
            )
        if "max_replicas" not in deployment:
            raise BuildArgsError(f"autoscaling ({', '.join(autoscaling)}) needs max_replicas, the most replicas to run")
        options["autoscaling_config"] = {
            "min_replicas": _number(deployment, "min_replicas", int, 1),
            "max_replicas": _number(deployment, "max_replicas", int),
            "target_ongoing_requests": _number(deployment, "target_ongoing_requests", float, settings.max_batch_size),
        }
    else:
        options["num_replicas"] = _number(deployment, "num_replicas", int, 1)
    try:
        return OpenELMReplica.options(**options).bind(settings)
    except (ValueError, TypeError) as error:  # Ray's own checks (pydantic): name the argument it refused
        raise BuildArgsError(f"Ray Serve refused the deployment options: {error}") from error


def _settings_from(values: dict) -> Settings:
    """The same parsing and checks as api.py's flags: each argument becomes its flag."""
    argv: list[str] = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if name in SWITCHES:
            argv.append(flag if _boolean(name, value) else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(str(item) for item in value)]
        else:
            argv += [flag, str(value)]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return load_settings(argv, environ={})
    except SystemExit:
        # argparse printed "usage: ... error: argument --max-batch-size: must be at least 1"; keep its reason.
        reason = stderr.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
        raise BuildArgsError(
            f"invalid argument: {reason} (arguments are api.py's flags, with _ for - and no leading --)"
        ) from None


def _boolean(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in TRUE_WORDS:
        return True
    if str(value).strip().lower() in FALSE_WORDS:
        return False
    raise BuildArgsError(f"{name}={value!r}: expected true or false")


def _number(args: dict, name: str, kind: type, default=None):
    if name not in args:
        return default
    try:
        # Through str, so that 2.5 is no integer (int(2.5) would quietly make it 2).
        return kind(str(args[name]))
    except (TypeError, ValueError):
        raise BuildArgsError(f"{name}={args[name]!r}: expected {'an integer' if kind is int else 'a number'}") from None


def _configure_logging(level: str) -> None:
    """The server's log lines, request ids included, on the replica's stderr: Ray shows them in
    `serve run`'s terminal and keeps them in the replica's worker log."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"))
    logger = logging.getLogger("openelm_server")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
