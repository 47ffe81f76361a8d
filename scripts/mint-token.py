#!/usr/bin/env python3
"""Mints an STS-shaped test token signed with the development key (.dev/signing-key.pem).

    .venv/bin/python scripts/mint-token.py --sub arn:aws:iam::111122223333:role/RabbitMqAdminRole
    .venv/bin/python scripts/mint-token.py --sub arn:aws:iam::111122223333:role/App --tag scope=team-a

The token has the claims of AWS STS GetWebIdentityToken (iss, aud, sub, iat, exp, jti and the
nested "https://sts.amazonaws.com/" object, request tags included). Development only.
"""
import argparse
import pathlib
import time
import uuid

import jwt

ROOT = pathlib.Path(__file__).resolve().parent.parent

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--sub", default="arn:aws:iam::111122223333:role/RabbitMqAdminRole", help="role ARN")
p.add_argument("--aud", default="rabbitmq")
p.add_argument("--iss", default="https://dev.tokens.sts.local")
p.add_argument("--duration", type=int, default=300, help="seconds (STS allows 60..3600)")
p.add_argument("--scope", help="a space-separated scope claim (STS tokens have none)")
p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="request tag")
p.add_argument("--key", default=str(ROOT / ".dev/signing-key.pem"))
a = p.parse_args()

now = int(time.time())
account = a.sub.split(":")[4] if a.sub.count(":") >= 5 else "111122223333"
claims = {
    "iss": a.iss, "aud": a.aud, "sub": a.sub, "iat": now, "exp": now + a.duration,
    "jti": str(uuid.uuid4()),
    "https://sts.amazonaws.com/": {
        "aws_account": account, "source_region": "us-east-1", "principal_id": a.sub,
        "request_tags": dict(t.split("=", 1) for t in a.tag),
    },
}
if a.scope:
    claims["scope"] = a.scope
key = pathlib.Path(a.key).read_bytes()
print(jwt.encode(claims, key, algorithm="RS256", headers={"kid": "dev-rsa"}))
