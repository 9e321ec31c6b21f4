"""`compozy auth setup-kube`: make kubectl get its token for a cluster from the agent.

Writes a kubeconfig user whose ``exec`` runs ``compozy auth kube-token`` and a
context joining it to the cluster, with kubectl's own ``kubectl config
set-credentials`` and ``set-context`` (so the kubeconfig is written the way
kubectl writes it, ``$KUBECONFIG`` and ``--kubeconfig`` included). What it
writes, for a cluster ``prod`` (``kubectl config view``)::

    users:
    - name: compozy-prod
      user:
        exec:
          apiVersion: client.authentication.k8s.io/v1
          command: /path/to/compozy
          args: [auth, kube-token]          # plus --profile/--audience when given
          interactiveMode: Never            # kubectl never hands it the terminal
          provideClusterInfo: true          # the server URL, for the config's rules:
"""

from __future__ import annotations

from compozy_client.commands.common import EXIT_OK, add_command, profile_option
from compozy_client.commands.output import info

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


EXAMPLES = """examples:
  compozy auth setup-kube --cluster prod
  compozy auth setup-kube --cluster prod --profile work --audience https://k8s.example.com
  kubectl --context prod get pods      # asks the agent for a token from now on"""


def add_parser(subparsers: Any) -> None:
    parser = add_command(subparsers, "setup-kube",
                         "Make kubectl get tokens for a cluster from the agent", EXAMPLES)
    parser.add_argument("--cluster", required=True, metavar="NAME",
                        help="the cluster's name in the kubeconfig")
    profile_option(parser)
    parser.add_argument("--audience", metavar="URI",
                        help="ask for tokens for this API (RFC 8707), e.g. the cluster's")
    parser.add_argument("--user", metavar="NAME",
                        help="the kubeconfig user to write (default: compozy-CLUSTER)")
    parser.add_argument("--context", metavar="NAME",
                        help="the context joining user and cluster (default: CLUSTER)")
    parser.add_argument("--kubeconfig", metavar="FILE",
                        help="the kubeconfig to write (default: kubectl's: $KUBECONFIG "
                             "or ~/.kube/config)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import shutil

    from compozy_client.errors import UsageError

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise UsageError("kubectl is not on PATH; install it first (Debian: kubernetes-client)")
    base = [kubectl, *(["--kubeconfig", args.kubeconfig] if args.kubeconfig else [])]
    clusters = _kubectl([*base, "config", "get-clusters"]).splitlines()[1:]
    if args.cluster not in clusters:
        raise UsageError(f"no cluster {args.cluster!r} in the kubeconfig (it has: "
                         f"{', '.join(clusters) or 'none'}); add it first with "
                         "kubectl config set-cluster")
    user = args.user or f"compozy-{args.cluster}"
    context = args.context or args.cluster
    _kubectl([*base, "config", "set-credentials", user, *exec_options(
        _compozy_command(), args.profile, args.audience,
        interactive_mode=_knows_interactive_mode(kubectl))])
    _kubectl([*base, "config", "set-context", context, f"--cluster={args.cluster}",
              f"--user={user}"])
    info(f"kubectl user {user!r} now gets its token from `compozy auth kube-token`; "
         f"context {context!r} joins it to cluster {args.cluster!r}")
    info(f"  use it: kubectl --context {context} get --raw /api   "
         f"(or: kubectl config use-context {context})")
    return EXIT_OK


def exec_options(command: str, profile: str | None, audience: str | None, *,
                 interactive_mode: bool) -> list[str]:
    """``kubectl config set-credentials`` options for the exec entry. A kubectl whose
    ``set-credentials`` lacks ``--exec-interactive-mode`` (older ones) gets the v1beta1
    plugin API, where the mode may be left out (client-go then treats it as
    IfAvailable, and the plugin still never prompts), and no
    ``--exec-provide-cluster-info`` (rules: then match by audience only)."""
    plugin_args = ["auth", "kube-token"]
    if profile:
        plugin_args += ["--profile", profile]
    if audience:
        plugin_args += ["--audience", audience]
    from compozy_client.kubetoken import API_V1, API_V1BETA1

    options = [f"--exec-command={command}",
               f"--exec-api-version={API_V1 if interactive_mode else API_V1BETA1}"]
    options += [f"--exec-arg={arg}" for arg in plugin_args]
    if interactive_mode:
        options.append("--exec-interactive-mode=Never")
        # The cluster's server URL reaches the plugin, so rules: can choose the profile by it.
        options.append("--exec-provide-cluster-info=true")
    return options


def _compozy_command() -> str:
    """The absolute path of the ``compozy`` command, so kubectl finds it whatever its PATH."""
    import os
    import shutil
    import sys

    found = shutil.which("compozy")
    if found is None:
        beside = os.path.join(os.path.dirname(sys.executable), "compozy")
        found = beside if os.access(beside, os.X_OK) else None
    return os.path.abspath(found) if found else "compozy"


def _knows_interactive_mode(kubectl: str) -> bool:
    usage = _kubectl([kubectl, "config", "set-credentials", "--help"])
    return "--exec-interactive-mode" in usage and "--exec-provide-cluster-info" in usage


def _kubectl(command: list[str]) -> str:
    import subprocess

    from compozy_client.errors import CompozyError

    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CompozyError(f"could not run kubectl ({exc.__class__.__name__})") from None
    if done.returncode != 0:
        detail = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise CompozyError(f"kubectl {' '.join(command[1:3])} failed: {detail[0]}")
    return done.stdout
