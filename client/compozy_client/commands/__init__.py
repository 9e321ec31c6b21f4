"""The `compozy` commands: one module each, named after the command.

    compozy login               login.py
    compozy logout              logout.py
    compozy exec                exec.py
    compozy auth status         auth_status.py
    compozy auth list           auth_list.py
    compozy auth refresh        auth_refresh.py
    compozy auth revoke         auth_revoke.py
    compozy auth revoke-all     auth_revoke_all.py
    compozy auth lock           auth_lock.py
    compozy auth unlock         auth_unlock.py
    compozy auth log            auth_log.py
    compozy auth token          auth_token.py (after compozy_client/fasttoken.py)
    compozy auth setup-git      auth_setup_git.py (the helper: compozy_client/gitcredential.py)
    compozy auth kube-token     auth_kube_token.py (after compozy_client/kubetoken.py)
    compozy auth setup-kube     auth_setup_kube.py
    compozy auth setup-docker   auth_setup_docker.py
    compozy completion          completion.py (and the hidden compozy __complete)

Each has ``add_parser(subparsers)`` (its options and examples) and
``run(args)`` (forward to the agent, print, return the exit code). They share
``output.py`` (printing), ``common.py`` (the config file, the agent
connection, questions on the terminal), ``revoking.py`` (what logout,
revoke and revoke-all do when the provider cannot be reached) and
``waiting.py`` (the status line while `compozy login` waits).
``compozy_client/cli.py`` builds the parser from them and runs one.

Nothing here is imported by ``compozy auth token``'s fast path, and every
module imports only os and sys at load time.
"""
