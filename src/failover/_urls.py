"""One helper to show URLs without their secrets, used everywhere a URL is shown."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["redact_url", "redact_text", "url_hosts"]

_MASK = "***"
_SECRET_PARAMS = frozenset({"password", "pass", "pwd", "token", "secret", "sslpassword", "authtoken"})
# scheme://user:password@  — also catches URLs embedded in driver error messages.
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s]*)@")
_KV_SECRET = re.compile(r"(?i)\b(password|token|secret)\s*=\s*('[^']*'|\"[^\"]*\"|[^\s&]+)")


def redact_url(url: str | None) -> str:
    """Return *url* with its password and secret query parameters masked.

    >>> redact_url("postgresql://postgres:s3cret@db.x.supabase.co:5432/postgres")
    'postgresql://postgres:***@db.x.supabase.co:5432/postgres'
    """
    if not url:
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user, sep, _ = userinfo.partition(":")
        netloc = f"{user}:{_MASK}@{hostinfo}" if sep else f"{userinfo}@{hostinfo}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, _MASK if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="*,")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Mask URL passwords, ``password=...`` pairs and any of *secrets* inside free text.

    Driver errors sometimes echo a connection string; every message that may
    carry one goes through here before it is logged, raised or shown.
    """
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{_MASK}@", text)
    text = _KV_SECRET.sub(lambda m: f"{m.group(1)}={_MASK}", text)
    for secret in secrets:
        if secret and len(secret) >= 3:
            text = text.replace(secret, _MASK)
    return text


def url_password(url: str | None) -> str | None:
    """The password in *url*, if any (used only to scrub it from messages)."""
    if not url:
        return None
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def url_hosts(url: str) -> list[str]:
    """Host names in *url* (several for ``mongodb://a,b,c/``), lower-cased, without ports."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return []
    hostinfo = netloc.rpartition("@")[2]
    hosts = []
    for item in hostinfo.split(","):
        item = item.strip()
        if item.startswith("["):
            hosts.append(item[1 : item.find("]")].lower())
        else:
            hosts.append(item.split(":")[0].lower())
    return [h for h in hosts if h]
