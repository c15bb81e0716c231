"""MongoDB URLs read without DNS lookups: one fixed server or not, and the client's options."""

from __future__ import annotations

import urllib.parse
from typing import Any

__all__ = ["DEFAULT_DATABASE", "DEFAULT_PORT", "client_options"]

DEFAULT_DATABASE = "app"
DEFAULT_PORT = 27017


def _split_url(url: str) -> tuple[str, list[str], dict[str, str]]:
    """``(scheme, hosts, options)`` of a MongoDB URL, without DNS lookups (keys lower-cased)."""
    scheme, _, rest = url.partition("://")
    netloc_end = len(rest)
    for sep in ("/", "?"):
        index = rest.find(sep)
        if index != -1:
            netloc_end = min(netloc_end, index)
    netloc = rest[:netloc_end]
    hosts_part = netloc.rpartition("@")[2]
    hosts = [h for h in hosts_part.split(",") if h]
    query = rest[netloc_end:].partition("?")[2]
    options = {k.lower(): v for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True)}
    return scheme.lower(), hosts, options


def _single_host(url: str) -> tuple[str, int] | None:
    """The ``(host, port)`` of a URL that names exactly one TCP server, else None.

    None for ``mongodb+srv``, several hosts, ``replicaSet``, ``loadBalanced`` or a
    Unix socket path: those are not one fixed server.
    """
    scheme, hosts, options = _split_url(url)
    if scheme != "mongodb" or len(hosts) != 1:
        return None
    if "replicaset" in options or options.get("loadbalanced", "").lower() == "true":
        return None
    host = urllib.parse.unquote(hosts[0])
    if host.endswith(".sock") or host.startswith("/"):
        return None
    if host.startswith("["):  # [::1]:27017
        name, _, tail = host[1:].partition("]")
        port_text = tail.removeprefix(":")
    else:
        name, _, port_text = host.partition(":")
    try:
        port = int(port_text) if port_text else DEFAULT_PORT
    except ValueError:
        return None
    return name, port


def client_options(url: str, *, connect_timeout: float, pool_min_size: int, pool_max_size: int) -> dict[str, Any]:
    """Keyword arguments for ``AsyncMongoClient(url, **options)``.

    ``directConnection=True`` is added when the URL names one server with no
    ``replicaSet`` (a single local server would otherwise be discovered as a
    replica-set member and never selected); an explicit ``directConnection``
    in the URL wins.
    """
    millis = max(1, int(connect_timeout * 1000))
    options: dict[str, Any] = {
        "serverSelectionTimeoutMS": millis,
        "connectTimeoutMS": millis,
        "minPoolSize": pool_min_size,
        "maxPoolSize": pool_max_size,
        "appname": "failover",
    }
    _, _, url_options = _split_url(url)
    if "directconnection" not in url_options and _single_host(url) is not None:
        options["directConnection"] = True
    return options

