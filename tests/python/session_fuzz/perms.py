"""RabbitMQ's OAuth 2.0 scope semantics, for the difference rules and the gateway oracles.

A port of `rabbit_oauth2_scope` and `wildcard` (the same in 3.10.8 and 4.2 for the scope
forms the generator writes): `<prefix><perm>:<vhost>/<name>[/<routing key>]`, each part a
pattern where `*` matches any run of characters (leftmost match, no backtracking), the
other characters URL-decoded; 2- and 3-part scopes both grant resource access, only 3-part
scopes grant topic access.
"""

from __future__ import annotations

import urllib.parse

PREFIX = "rabbitmq."


def wildcard_match(subject: str, pattern: str) -> bool:
    try:
        parts = [urllib.parse.unquote_plus(p, errors="strict") for p in pattern.split("*")]
    except UnicodeDecodeError:
        return False
    first, rest = parts[0], parts[1:]
    if not subject.startswith(first):
        return False
    pos, length = len(first), len(subject)
    while True:
        if rest == [""]:
            return True
        if not rest:
            return pos == length
        if pos == length:
            return False
        if rest[0] == "":
            rest = rest[1:]
            continue
        i = subject.find(rest[0], pos)
        if i < 0:
            return False
        pos = i + len(rest[0])
        rest = rest[1:]


class Perms:
    def __init__(self, scopes: list[str]):
        self.grants = []
        for s in scopes:
            if not s.startswith(PREFIX):
                continue
            s = s[len(PREFIX):]
            perm, sep, pat = s.partition(":")
            if not sep or perm not in ("read", "write", "configure"):
                continue
            parts = pat.split("/")
            if len(parts) == 2:
                self.grants.append((perm, parts[0], parts[1], None))
            elif len(parts) == 3:
                self.grants.append((perm, parts[0], parts[1], parts[2]))

    def vhost(self, vhost: str) -> bool:
        return any(wildcard_match(vhost, g[1]) for g in self.grants)

    def resource(self, perm: str, vhost: str, name: str) -> bool:
        return any(g[0] == perm and wildcard_match(vhost, g[1]) and wildcard_match(name, g[2])
                   for g in self.grants)

    def any_resource(self, vhost: str, name: str) -> bool:
        return any(self.resource(p, vhost, name) for p in ("read", "write", "configure"))

    def topic(self, perm: str, vhost: str, exchange: str, rk: str) -> bool:
        return any(g[0] == perm and g[3] is not None and wildcard_match(vhost, g[1])
                   and wildcard_match(exchange, g[2]) and wildcard_match(rk, g[3])
                   for g in self.grants)


def fill(scopes: list[str], vhost: str) -> list[str]:
    return [s.replace("{V}", vhost) for s in scopes]
