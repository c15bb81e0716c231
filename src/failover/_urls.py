"""One helper to show URLs without their secrets, used everywhere a URL is shown."""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

__all__ = ["redact_url", "redact_text", "url_hosts", "url_password", "userinfo_is_ambiguous"]

_MASK = "***"
_SECRET_PARAMS = frozenset({"password", "pass", "pwd", "token", "secret", "sslpassword", "authtoken"})
# scheme://user:password@  — also catches URLs embedded in driver error messages.
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s]*)@")
_KV_SECRET = re.compile(r"(?i)\b(password|token|secret)\s*=\s*('[^']*'|\"[^\"]*\"|[^\s&]+)")


def _userinfo_span(url: str) -> tuple[int, int] | None:
    """Where ``user:password`` sits in *url*, read from the raw text.

    A password may hold ``/``, ``#`` or ``?`` that its owner forgot to
    percent-encode; a URL parser then ends the host part early and sees no
    password at all. Reading up to the last ``@`` finds it anyway.
    """
    start = url.find("://")
    if start < 0:
        return None
    start += 3
    at = url.rfind("@")
    if at < start:
        return None
    return start, at


def redact_url(url: str | None) -> str:
    """Return *url* with its password and secret query parameters masked.

    >>> redact_url("postgresql://postgres:s3cret@db.x.supabase.co:5432/postgres")
    'postgresql://postgres:***@db.x.supabase.co:5432/postgres'
    """
    if not url:
        return ""
    span = _userinfo_span(url)
    if span is not None:
        start, at = span
        user, sep, _ = url[start:at].partition(":")
        url = f"{url[:start]}{user}:{_MASK}{url[at:]}" if sep else url
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    query = parts.query
    if not query:
        return url
    pairs = parse_qsl(query, keep_blank_values=True)
    query = urlencode([(k, _MASK if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="*,")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def userinfo_is_ambiguous(url: str) -> bool:
    """True when the password holds a character a URL parser reads as the end of the host."""
    if _userinfo_span(url) is None:
        return False
    return "@" not in _netloc(url)


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
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


def url_secrets(url: str | None) -> tuple[str, ...]:
    """The password in *url*, as written and percent-decoded (to scrub both from messages)."""
    if not url:
        return ()
    span = _userinfo_span(url)
    if span is None:
        return ()
    password = url[span[0] : span[1]].partition(":")[2]
    if not password:
        return ()
    return tuple(dict.fromkeys((password, unquote(password))))


def url_password(url: str | None) -> str | None:
    """The password in *url* as written, if any."""
    found = url_secrets(url)
    return found[0] if found else None


def _netloc(url: str) -> str:
    """What stands between ``scheme://`` and the path, query or fragment.

    Not ``urlsplit()``: Python builds with its newer bracket check (Debian's 3.11.2 among
    them) refuse a seed list that holds an IPv6 host (``a:1,[::1]:2``) as an invalid URL.
    """
    _scheme, sep, rest = url.partition("://")
    if not sep:
        return ""
    for end in "/?#":
        rest = rest.split(end, 1)[0]
    return rest


def url_hosts(url: str) -> list[str]:
    """Host names in *url* (several for ``mongodb://a,b,c/``), lower-cased, without ports."""
    netloc = _netloc(url)
    if not netloc:
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
