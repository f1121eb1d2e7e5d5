"""Command-line options that choose and configure where steps run.

Shared by every command that runs steps (``run``, ``notebook run``), so that
``--backend kubernetes --image ... --memory 1Gi`` means the same everywhere.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from jobrunner.backends._quantity import memory_bytes
from jobrunner.backends.base import Backend
from jobrunner.errors import InvalidInput

if TYPE_CHECKING:
    from jobrunner.backends.kubernetes import KubernetesOptions

__all__ = [
    "BackendChoice",
    "backend_options",
    "cluster_options",
    "kubernetes_options",
    "make_backend",
]

R = TypeVar("R")

_PANEL = "Where steps run"

BackendName = Annotated[
    str,
    typer.Option(
        "--backend",
        envvar="JOBRUNNER_BACKEND",
        help="local (a process per step) or kubernetes (a Job per step).",
        rich_help_panel=_PANEL,
    ),
]
Warm = Annotated[
    bool,
    typer.Option(
        "--warm",
        help="local: fork each step from a warm parent (faster start).",
        rich_help_panel=_PANEL,
    ),
]
Memory = Annotated[
    str | None,
    typer.Option(
        "--memory",
        help="Memory limit of a step, e.g. 512Mi (local: address space).",
        rich_help_panel=_PANEL,
    ),
]
Cpu = Annotated[
    str | None,
    typer.Option(
        "--cpu", help="kubernetes: CPU limit, e.g. 500m.", rich_help_panel=_PANEL
    ),
]
Gpus = Annotated[
    int,
    typer.Option(
        "--gpus", help="kubernetes: nvidia.com/gpu to request.", rich_help_panel=_PANEL
    ),
]
Image = Annotated[
    str | None,
    typer.Option(
        "--image",
        envvar="JOBRUNNER_IMAGE",
        help="kubernetes: the step image.",
        rich_help_panel=_PANEL,
    ),
]
Namespace = Annotated[
    str,
    typer.Option(
        "--namespace",
        "-n",
        envvar="JOBRUNNER_NAMESPACE",
        help="kubernetes: the namespace.",
        rich_help_panel=_PANEL,
    ),
]
Kubeconfig = Annotated[
    str | None,
    typer.Option(
        "--kubeconfig", help="kubernetes: a kubeconfig file.", rich_help_panel=_PANEL
    ),
]
Context = Annotated[
    str | None,
    typer.Option(
        "--context", help="kubernetes: the kubeconfig context.", rich_help_panel=_PANEL
    ),
]
RetryOom = Annotated[
    bool,
    typer.Option(
        "--retry-oom",
        help="kubernetes: rerun an OOM-killed step with twice the memory.",
        rich_help_panel=_PANEL,
    ),
]
EnvSecret = Annotated[
    str | None,
    typer.Option(
        "--env-secret",
        help="kubernetes: a Secret whose keys become environment.",
        rich_help_panel=_PANEL,
    ),
]
ServiceAccount = Annotated[
    str | None,
    typer.Option(
        "--service-account",
        help="kubernetes: the pod's ServiceAccount.",
        rich_help_panel=_PANEL,
    ),
]
NodeSelector = Annotated[
    list[str] | None,
    typer.Option(
        "--node-selector",
        metavar="KEY=VALUE",
        help="kubernetes: a node label to require.",
        rich_help_panel=_PANEL,
    ),
]


@dataclass(frozen=True)
class BackendChoice:
    """What the backend options of one command said."""

    name: str = "local"
    warm: bool = False
    memory: str | None = None
    cpu: str | None = None
    gpus: int = 0
    image: str | None = None
    namespace: str = "default"
    kubeconfig: str | None = None
    context: str | None = None
    retry_oom: bool = False
    env_secret: str | None = None
    service_account: str | None = None
    node_selector: tuple[str, ...] = ()


# Each field of BackendChoice, with the option that sets it.
_OPTIONS: dict[str, Any] = {
    "name": BackendName,
    "warm": Warm,
    "memory": Memory,
    "cpu": Cpu,
    "gpus": Gpus,
    "image": Image,
    "namespace": Namespace,
    "kubeconfig": Kubeconfig,
    "context": Context,
    "retry_oom": RetryOom,
    "env_secret": EnvSecret,
    "service_account": ServiceAccount,
    "node_selector": NodeSelector,
}
_PREFIX = "backend_option_"


def backend_options(command: Callable[..., R]) -> Callable[..., R]:
    """Give a command the backend options; it receives them as ``backend``.

    The command declares ``backend: BackendChoice`` (no default); its users see
    ``--backend``, ``--warm``, ``--memory``, ``--image``... the same options in
    every command that runs steps.
    """
    return _with_options(command, set(_OPTIONS), {})


def cluster_options(command: Callable[..., R]) -> Callable[..., R]:
    """Like :func:`backend_options`, for commands whose steps always run on
    Kubernetes: no ``--backend`` and no ``--warm``."""
    return _with_options(
        command, set(_OPTIONS) - {"name", "warm"}, {"name": "kubernetes"}
    )


def _with_options(
    command: Callable[..., R], shown: set[str], fixed: dict[str, Any]
) -> Callable[..., R]:
    signature = inspect.signature(command, eval_str=True)
    kept = [p for p in signature.parameters.values() if p.name != "backend"]
    defaults = {field.name: field.default for field in fields(BackendChoice)}
    added = [
        inspect.Parameter(
            _PREFIX + name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=annotation,
            default=None if name == "node_selector" else defaults[name],
        )
        for name, annotation in _OPTIONS.items()
        if name in shown
    ]

    @functools.wraps(command)
    def with_backend(*args: Any, **kwargs: Any) -> R:
        given = {name: kwargs.pop(_PREFIX + name) for name in shown} | fixed
        given["node_selector"] = tuple(given["node_selector"] or ())
        return command(*args, backend=BackendChoice(**given), **kwargs)

    with_backend.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[
            *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in kept),
            *added,
        ]
    )
    return with_backend


def make_backend(choice: BackendChoice) -> Backend:
    """Build the backend the options describe.

    Raises:
        InvalidInput: An unknown backend or a malformed option.
    """
    if choice.name == "local":
        from jobrunner.backends.local import LocalBackend

        limit = memory_bytes(choice.memory) if choice.memory else None
        return LocalBackend(warm=choice.warm, memory_limit=limit)
    if choice.name == "kubernetes":
        return _kubernetes(choice)
    raise InvalidInput(f"unknown backend {choice.name!r}: use local or kubernetes")


def kubernetes_options(choice: BackendChoice) -> KubernetesOptions:
    """Return the Job options the backend options describe, without connecting.

    Raises:
        InvalidInput: A malformed ``--node-selector``.
    """
    from jobrunner.backends.kubernetes import KubernetesOptions

    selector = {}
    for pair in choice.node_selector:
        key, separator, value = pair.partition("=")
        if not separator:
            raise InvalidInput(f"--node-selector expects KEY=VALUE, got {pair!r}")
        selector[key] = value
    return KubernetesOptions(
        namespace=choice.namespace,
        image=choice.image or KubernetesOptions.image,
        memory_limit=choice.memory,
        memory_request=choice.memory,
        cpu_limit=choice.cpu,
        gpus=choice.gpus,
        retry_oom=choice.retry_oom,
        env_secret=choice.env_secret,
        service_account=choice.service_account,
        node_selector=selector,
    )


def _kubernetes(choice: BackendChoice) -> Backend:
    from jobrunner.backends.kubernetes import KubernetesBackend

    options = kubernetes_options(choice)
    return KubernetesBackend(
        options, kubeconfig=choice.kubeconfig, context=choice.context
    )
