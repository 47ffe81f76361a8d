"""Differential test: the gateway's broker policies (src/authz/iam) against moto's IAM policy
evaluation, on the part of IAM's JSON grammar moto implements.

moto (pinned in requirements.txt) evaluates identity policies in-process:
`moto.iam.access_control.IAMPolicy(doc).is_action_permitted(action, resource)` answers
PERMITTED, DENIED (an explicit Deny applies) or NEUTRAL (no statement applies: the implicit
deny). The gateway answers through `amqp-iam-gateway simulate --json` with `request` rows
(one action name, one resource ARN, decided like AWS's policy simulator). The mapping:

    moto PERMITTED  <->  permitted
    moto DENIED     <->  not permitted, `statement` names the Deny statement
    moto NEUTRAL    <->  not permitted, `statement` is null

For the first two, the statement the gateway names must also be one that moto, statement by
statement (IAMPolicyStatement), finds applying with that effect.

What is compared: seeded random policies (3 seeds x 100 policies of 1-4 statements; Effect
Allow/Deny; Action or NotAction as a string or a list, exact names and `*` patterns; Resource
as `*`, exact ARNs and `*` patterns over a small universe of vhosts, queues, exchanges and
topic resources), 60 requests each, drawn from the same universe plus resources that match
none of it. Every generated document also passes moto's IAMPolicyDocumentValidator.

What moto does not do as AWS documents, and is therefore kept out of the random comparison
(each deviation is demonstrated by `test_moto_deviations_still_hold`, and the table cases
check the gateway on these features against AWS's documented behaviour instead):

  * NotResource. moto's IAMPolicyStatement only looks at "Resource"; a statement without it
    ("for trust policies") answers PERMITTED whatever its Effect and its NotResource, so
    `Deny ... NotResource` allows. No random policy has NotResource.
  * `?` wildcards. moto's `_match` only turns `*` into `.*` and hands the rest to `re`, where
    `?` is a quantifier. No random pattern has `?`.
  * Regular-expression characters. For the same reason `.` in a pattern matches any
    character in moto (`orders.eu` matches `orders-eu`); IAM matches it literally.
  * Case of action names. IAM matches action names without regard to case; moto's `re.match`
    is case-sensitive.
  The last two can arise in random cases (the universe's names contain dots, so moto's
  `queue/*.*` matches `queue/other`; `rabbitmq:*Bind` names `rabbitmq:QueueUnbind` only
  without regard to case). So every random case is screened: when, for some pattern of the policy, moto's
  `_match` and IAM's documented matching (`*` any run, `?` one character, everything else
  literal; actions case-insensitive; ARNs segment by segment, case-sensitive) disagree on the
  request, the case is excluded and counted by reason.

Conditions and principals are not generated: moto's evaluator is asked without a
principal, so it only checks that a string Principal is "*"; every statement has
`"Principal": "*"`, which the broker requires. Nor are patterns AWS refuses: a wildcard in an
ARN's service segment ("You can't use a wildcard in the service segment"; moto's validator
accepts it, the gateway refuses it), part of a partition (`aws*`) or part of an action's
vendor (`rabbit*:Get`; moto's validator and the gateway both refuse them).

Finally a handful of malformed documents that both moto's IAMPolicyDocumentValidator and the
gateway's check-config must reject, each checked to be rejected by the gateway for the
intended reason (the JSON path it names).
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import moto
import pytest
from moto.iam.access_control import IAMPolicy, IAMPolicyStatement, PermissionResult
from moto.iam.exceptions import MalformedPolicyDocument
from moto.iam.policy_validation import IAMPolicyDocumentValidator

import conftest
from conftest import _write_config, _write_tls, gateway_binary, mint

PERMITTED = PermissionResult.PERMITTED
DENIED = PermissionResult.DENIED
NEUTRAL = PermissionResult.NEUTRAL

POLICY_FILE = "policy.json"

# --------------------------------------------------------------------------------------
# the universe

ACTIONS = [
    "rabbitmq:Connect", "rabbitmq:Configure", "rabbitmq:Write", "rabbitmq:Read",
    "rabbitmq:ExchangeDeclare", "rabbitmq:ExchangeDelete", "rabbitmq:ExchangeBind",
    "rabbitmq:ExchangeUnbind", "rabbitmq:QueueDeclare", "rabbitmq:QueueDelete",
    "rabbitmq:QueuePurge", "rabbitmq:QueueBind", "rabbitmq:QueueUnbind",
    "rabbitmq:Publish", "rabbitmq:Consume", "rabbitmq:Get",
]

PREFIX = "arn:aws:rabbitmq:::"
VHOSTS = ["%2F", "prod"]  # `/` is written %2F in ARNs
QUEUES = ["orders.eu", "orders.us", "audit.x"]
EXCHANGES = ["orders", "amq.default"]
ROUTING_KEYS = ["eu.new", "us.new", "eu.cancel"]


def _universe() -> list[str]:
    """The resource parts (after the fifth colon) of the broker's resources."""
    out = []
    for v in VHOSTS:
        out.append(f"vhost/{v}")
        out += [f"vhost/{v}/queue/{q}" for q in QUEUES]
        out += [f"vhost/{v}/exchange/{e}" for e in EXCHANGES]
        out += [f"vhost/{v}/topic/{e}/{k}" for e in EXCHANGES for k in ROUTING_KEYS]
    return out


UNIVERSE = _universe()
RESOURCES = [PREFIX + r for r in UNIVERSE]

# Requests outside the universe: some still match broad patterns, none matches an exact one.
ODD_RESOURCES = [
    PREFIX + "vhost/dev",
    PREFIX + "vhost/dev/queue/orders.eu",
    PREFIX + "vhost/prod/queue/other",
    PREFIX + "vhost/prod/queue/orders",  # an exchange's name as a queue
    PREFIX + "vhost/PROD/queue/orders.eu",  # resources are case-sensitive
    PREFIX + "vhost/%2f/queue/orders.eu",  # ... the escape too
    PREFIX + "vhost/prod/queue/x:y",  # a colon in the resource part
    PREFIX + "vhost/prod/queue/orders.eu/extra",
    PREFIX + "vhost/prod/exchange/",  # the default exchange's empty name
    "arn:aws:rabbitmq:us-east-1::vhost/prod",  # a region: segment 4 differs
    "arn:aws:rabbitmq::111122223333:vhost/prod/queue/orders.eu",
    "arn:aws-cn:rabbitmq:::vhost/prod/queue/orders.eu",
    "arn:aws:sqs:us-east-1:111122223333:orders.eu",
]

# ARN headers for patterns: wildcards in the region and account segments, and `*` as the
# whole partition; never in the service segment, nor part of the partition (AWS refuses
# those: "Resource vendor must be fully qualified and cannot contain regexes", "Partition
# "aws*" is not valid").
PATTERN_HEADERS = [
    "arn:*:rabbitmq:::", "arn:aws:rabbitmq:*::", "arn:aws:rabbitmq::*:",
    "arn:aws:rabbitmq:*:*:", "arn:aws:rabbitmq:us-*::",
]

SEEDS = [20240601, 7, 424242]
POLICIES_PER_SEED = 100
REQUESTS_PER_POLICY = 60


# --------------------------------------------------------------------------------------
# IAM's documented matching, to screen out moto's deviations (not to decide cases)


def _glob_regex(pattern: str) -> str:
    return "".join(
        ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern
    )


def iam_action_matches(pattern: str, action: str) -> bool:
    """IAM: `*` any run, `?` one character, without regard to case."""
    return re.fullmatch(_glob_regex(pattern), action, re.IGNORECASE | re.DOTALL) is not None


def iam_arn_like(pattern: str, arn: str) -> bool:
    """IAM's ArnLike: `*` alone matches everything; otherwise the six colon-separated
    segments (the sixth keeps its colons) are matched pairwise, case-sensitively."""
    if pattern == "*":
        return True
    ps, rs = pattern.split(":", 5), arn.split(":", 5)
    return (
        len(ps) == 6
        and len(rs) == 6
        and all(re.fullmatch(_glob_regex(p), r, re.DOTALL) for p, r in zip(ps, rs))
    )


def moto_matches(pattern: str, value: str) -> bool:
    return IAMPolicyStatement._match(pattern, value) is not None


def _as_list(v) -> list[str]:
    return v if isinstance(v, list) else [v]


def _statements(policy: dict) -> list[dict]:
    s = policy["Statement"]
    return s if isinstance(s, list) else [s]


def moto_deviations(policy: dict, action: str, resource: str) -> list[str]:
    """Why moto's answer for this request cannot be trusted (empty: it can)."""
    reasons = []
    for st in _statements(policy):
        assert "NotResource" not in st, "NotResource is not compared with moto"
        for p in _as_list(st.get("Action", st.get("NotAction"))):
            assert "?" not in p
            if moto_matches(p, action) != iam_action_matches(p, action):
                reasons.append("action pattern case (moto is case-sensitive)")
        for p in _as_list(st["Resource"]):
            assert "?" not in p
            if moto_matches(p, resource) != iam_arn_like(p, resource):
                reasons.append("resource pattern read as a regex by moto")
    return sorted(set(reasons))


# --------------------------------------------------------------------------------------
# the generator


def _action_pattern(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.07:
        return "*"
    if r < 0.15:
        return "rabbitmq:*"
    name = rng.choice(ACTIONS)
    if r < 0.55:
        return name
    if r < 0.80:
        # A camel-case word of the action, or the vendor, replaced by `*`.
        vendor, op = name.split(":")
        words = re.findall(r"[A-Z][a-z]*", op)
        if rng.random() < 0.2:
            return "*:" + op
        i = rng.randrange(len(words))
        words[i] = "*"
        return f"{vendor}:{''.join(words)}"
    # Any span (maybe empty) of the action's name replaced by `*`, once or twice; it still
    # matches `name`. The vendor stays whole (AWS: "Vendor rabbit* is not valid").
    vendor, p = name.split(":")
    for _ in range(rng.choice([1, 1, 2])):
        i = rng.randrange(len(p) + 1)
        j = min(len(p), i + rng.randrange(0, 6))
        p = p[:i] + "*" + p[j:]
    return re.sub(r"\*+", "*", f"{vendor}:{p}")


def _resource_pattern(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.10:
        return "*"
    if r < 0.15:
        return rng.choice([PREFIX + "*", PREFIX + "vhost/*", PREFIX + "vhost/prod*"])
    base = rng.choice(UNIVERSE)
    if r < 0.45:
        return PREFIX + base
    header = rng.choice(PATTERN_HEADERS) if rng.random() < 0.25 else PREFIX
    tokens = re.split(r"([/.])", base)  # words and their separators
    words = [i for i, t in enumerate(tokens) if t not in ("/", ".")]
    for _ in range(rng.choice([1, 1, 2])):
        i = rng.choice(words)
        kind = rng.random()
        if kind < 0.45:
            tokens[i] = "*"
        elif kind < 0.75 and tokens[i] not in ("", "*"):
            k = rng.randrange(len(tokens[i]))
            tokens[i] = tokens[i][:k] + "*" if rng.random() < 0.5 else "*" + tokens[i][k:]
        else:
            # Everything from this word on is one `*`.
            tokens = tokens[:i] + ["*"]
            words = [w for w in words if w <= i]
    return header + re.sub(r"\*+", "*", "".join(tokens))


def _element(rng: random.Random, make) -> str | list[str]:
    n = rng.choice([1, 1, 1, 2, 3])
    values = [make(rng) for _ in range(n)]
    if n == 1 and rng.random() < 0.5:
        return values[0]
    return values


def random_policy(rng: random.Random) -> dict:
    statements = []
    for i in range(rng.randint(1, 4)):
        st: dict = {}
        if rng.random() < 0.8:
            st["Sid"] = f"S{i}"
        st["Effect"] = "Allow" if rng.random() < 0.6 else "Deny"
        st["Principal"] = "*"
        key = "Action" if rng.random() < 0.75 else "NotAction"
        st[key] = _element(rng, _action_pattern)
        st["Resource"] = _element(rng, _resource_pattern)
        statements.append(st)
    doc = {"Version": "2012-10-17", "Statement": statements}
    if len(statements) == 1 and rng.random() < 0.3:
        doc["Statement"] = statements[0]
    return doc


def random_requests(rng: random.Random, policy: dict, n: int) -> list[tuple[str, str]]:
    # Exact ARNs the policy names are drawn more often, so that statements apply.
    named = [
        r for st in _statements(policy) for r in _as_list(st["Resource"])
        if "*" not in r
    ]
    out = []
    for _ in range(n):
        action = rng.choice(ACTIONS)
        x = rng.random()
        if x < 0.2 and named:
            resource = rng.choice(named)
        elif x < 0.8:
            resource = rng.choice(RESOURCES)
        else:
            resource = rng.choice(ODD_RESOURCES)
        out.append((action, resource))
    return out


# --------------------------------------------------------------------------------------
# the two evaluators


class Simulator:
    """`amqp-iam-gateway simulate` with one policy document, mode "policies"."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.binary = gateway_binary()
        _write_tls(workdir)
        config = _write_config(workdir, conftest._free_port(), conftest._free_port())
        config.write_text(
            config.read_text()
            + f'\n[authorization]\nmode = "policies"\npolicies = ["{POLICY_FILE}"]\n'
        )
        self.config = config
        (workdir / "token").write_text(mint("policy-moto"))
        self.runs = 0

    def write_policy(self, policy: dict | str) -> None:
        text = policy if isinstance(policy, str) else json.dumps(policy, indent=1)
        (self.dir / POLICY_FILE).write_text(text)

    def decide(self, policy: dict, requests: list[tuple[str, str]]) -> list[dict]:
        self.write_policy(policy)
        ops = "".join(f"request action={a} resource={r}\n" for a, r in requests)
        (self.dir / "ops.txt").write_text(ops)
        proc = subprocess.run(
            [str(self.binary), "simulate", "--config", str(self.config),
             "--operations", "ops.txt", "--token-file", "token", "--json"],
            capture_output=True, text=True, timeout=60, cwd=self.dir,
        )
        self.runs += 1
        assert proc.returncode == 0, (
            f"simulate failed (exit {proc.returncode}) for policy\n"
            f"{json.dumps(policy, indent=1)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
        report = json.loads(proc.stdout)
        assert report["accepted"] is True, report
        results = report["results"]
        assert [r["row"] for r in results] == list(range(1, len(requests) + 1))
        for r in results:
            assert "error" not in r, r
        return results

    def check_config(self, text: str) -> subprocess.CompletedProcess:
        self.write_policy(text)
        return subprocess.run(
            [str(self.binary), "check-config", "--config", str(self.config)],
            capture_output=True, text=True, timeout=60, cwd=self.dir,
        )


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Simulator:
    return Simulator(tmp_path_factory.mktemp("policy-moto"))


def _statement_index(statement_id: str, policy: dict) -> int:
    """`policy.json:S2` or `policy.json:Statement[2]` -> the statement's index."""
    doc, _, name = statement_id.partition(":")
    assert doc == POLICY_FILE, statement_id
    m = re.fullmatch(r"Statement\[(\d+)\]", name)
    if m:
        return int(m.group(1))
    sids = [st.get("Sid") for st in _statements(policy)]
    assert name in sids, (statement_id, sids)
    return sids.index(name)


def ours(result: dict, policy: dict) -> tuple[PermissionResult, int | None]:
    """The gateway's answer in moto's terms, and the deciding statement's index."""
    stmt = result["statement"]
    index = None if stmt is None else _statement_index(stmt, policy)
    if result["permitted"]:
        assert stmt is not None, result
        return PERMITTED, index
    return (NEUTRAL if stmt is None else DENIED), index


def compare(policy: dict, request: tuple[str, str], result: dict) -> str | None:
    """None when the gateway agrees with moto, else a description of the disagreement."""
    action, resource = request
    doc = json.dumps(policy)
    expected = IAMPolicy(doc).is_action_permitted(action, resource)
    got, index = ours(result, policy)
    problem = None
    if got != expected:
        problem = f"moto {expected.name}, gateway {got.name} ({result['decided_by']})"
    elif index is not None:
        # The statement named must be one that applies, with the effect that decided.
        per_statement = IAMPolicyStatement(_statements(policy)[index]).is_action_permitted(
            action, resource
        )
        if per_statement != got:
            problem = (
                f"gateway names statement {result['statement']} (index {index}), "
                f"which moto finds {per_statement.name}"
            )
    if problem is None:
        return None
    return (
        f"{problem}\n  request: action={action} resource={resource}\n"
        f"  policy: {json.dumps(policy)}"
    )


# --------------------------------------------------------------------------------------
# the random differential

STATS: Counter = Counter()


@pytest.mark.parametrize("seed", SEEDS)
def test_random_policies_agree_with_moto(sim: Simulator, seed: int):
    rng = random.Random(seed)
    started = time.monotonic()
    failures: list[str] = []
    compared = Counter()
    excluded = Counter()
    for _ in range(POLICIES_PER_SEED):
        policy = random_policy(rng)
        # The generated documents are valid for moto's (AWS-like) validator too.
        IAMPolicyDocumentValidator(json.dumps(policy)).validate()
        requests = random_requests(rng, policy, REQUESTS_PER_POLICY)
        results = sim.decide(policy, requests)
        for request, result in zip(requests, results):
            reasons = moto_deviations(policy, *request)
            if reasons:
                excluded.update(reasons)
                continue
            got, _ = ours(result, policy)
            compared[got.name] += 1
            problem = compare(policy, request, result)
            if problem:
                failures.append(problem)
    elapsed = time.monotonic() - started
    STATS.update({f"compared {k}": v for k, v in compared.items()})
    STATS.update({f"excluded: {k}": v for k, v in excluded.items()})
    STATS["milliseconds"] += round(elapsed * 1000)
    summary = (
        f"seed {seed}: {sum(compared.values())} cases compared "
        f"({dict(compared)}), {sum(excluded.values())} excluded ({dict(excluded)}), "
        f"{elapsed:.1f} s"
    )
    if seed == SEEDS[-1]:
        conftest.TERMINAL_REPORTS.append((
            f"policies vs moto {moto.__version__}",
            "\n".join(f"{k}: {v}" for k, v in sorted(STATS.items())),
        ))
    # Every answer class must have been exercised, or the comparison proves little.
    assert min(compared[k] for k in ("PERMITTED", "DENIED", "NEUTRAL")) >= 50, summary
    assert not failures, (
        f"{len(failures)} disagreements with moto ({summary}); the first ones:\n\n"
        + "\n\n".join(failures[:10])
    )


# --------------------------------------------------------------------------------------
# hand-written cases: IAM's documented behaviour, compared with moto where moto follows it

Q = PREFIX + "vhost/prod/queue/"
Q_ROOT = PREFIX + "vhost/%2F/queue/"


def _stmt(effect: str, resource=None, *, action=None, not_action=None, not_resource=None,
          sid: str | None = None) -> dict:
    st: dict = {}
    if sid:
        st["Sid"] = sid
    st["Effect"] = effect
    st["Principal"] = "*"
    if action is not None:
        st["Action"] = action
    if not_action is not None:
        st["NotAction"] = not_action
    if resource is not None:
        st["Resource"] = resource
    if not_resource is not None:
        st["NotResource"] = not_resource
    return st


def _doc(*statements: dict) -> dict:
    return {"Version": "2012-10-17", "Statement": list(statements)}


# (name, policy, [(action, resource, expected)], moto follows AWS here)
TABLE = [
    (
        "explicit deny beats allow, in either order",
        _doc(
            _stmt("Allow", "*", action="rabbitmq:*", sid="AllowAll"),
            _stmt("Deny", Q + "audit.*", action=["rabbitmq:Get", "rabbitmq:Consume"],
                  sid="NoAuditReads"),
            _stmt("Allow", Q + "audit.x", action="rabbitmq:Get", sid="AllowAuditGet"),
        ),
        [
            ("rabbitmq:Get", Q + "audit.x", DENIED),
            ("rabbitmq:Consume", Q + "audit.x", DENIED),
            ("rabbitmq:Publish", Q + "audit.x", PERMITTED),
            ("rabbitmq:Get", Q + "orders.eu", PERMITTED),
        ],
        True,
    ),
    (
        "a Deny whose resource does not match does not apply",
        _doc(
            _stmt("Deny", PREFIX + "vhost/prod/*", action="rabbitmq:Publish"),
            _stmt("Allow", "*", action="rabbitmq:Publish"),
        ),
        [
            ("rabbitmq:Publish", Q_ROOT + "orders.eu", PERMITTED),
            ("rabbitmq:Publish", Q + "orders.eu", DENIED),
            ("rabbitmq:Consume", Q + "orders.eu", NEUTRAL),
        ],
        True,
    ),
    (
        "nothing applies: implicit deny",
        _doc(_stmt("Allow", Q + "orders.eu", action="rabbitmq:Consume")),
        [
            ("rabbitmq:Publish", Q + "orders.eu", NEUTRAL),
            ("rabbitmq:Consume", Q + "orders.us", NEUTRAL),
            ("rabbitmq:Consume", Q + "orders.eu", PERMITTED),
        ],
        True,
    ),
    (
        "NotAction with Allow: every action but those named",
        _doc(_stmt("Allow", "*", not_action=["rabbitmq:Get", "rabbitmq:Queue*"])),
        [
            ("rabbitmq:Publish", Q + "orders.eu", PERMITTED),
            ("rabbitmq:Get", Q + "orders.eu", NEUTRAL),
            ("rabbitmq:QueuePurge", Q + "orders.eu", NEUTRAL),
            ("rabbitmq:ExchangeDeclare", PREFIX + "vhost/prod/exchange/orders", PERMITTED),
        ],
        True,
    ),
    (
        "NotAction with Deny: a read-only policy",
        _doc(
            _stmt("Allow", "*", action="rabbitmq:*"),
            _stmt("Deny", "*", not_action=["rabbitmq:Connect", "rabbitmq:Read",
                                           "rabbitmq:Consume", "rabbitmq:Get"]),
        ),
        [
            ("rabbitmq:Consume", Q + "orders.eu", PERMITTED),
            ("rabbitmq:Connect", PREFIX + "vhost/prod", PERMITTED),
            ("rabbitmq:Publish", PREFIX + "vhost/prod/exchange/orders", DENIED),
            ("rabbitmq:QueueDelete", Q + "orders.eu", DENIED),
        ],
        True,
    ),
    (
        "Resource `*` spans `/` within the resource part",
        _doc(_stmt("Allow", PREFIX + "vhost/*/orders.eu", action="rabbitmq:Publish")),
        [
            ("rabbitmq:Publish", Q + "orders.eu", PERMITTED),
            ("rabbitmq:Publish", Q_ROOT + "orders.eu", PERMITTED),
            ("rabbitmq:Publish", Q + "orders.us", NEUTRAL),
        ],
        True,
    ),
    (
        "resources are case-sensitive",
        _doc(_stmt("Allow", PREFIX + "vhost/PROD/*", action="rabbitmq:Publish")),
        [
            ("rabbitmq:Publish", Q + "orders.eu", NEUTRAL),
            ("rabbitmq:Publish", PREFIX + "vhost/PROD/queue/orders.eu", PERMITTED),
        ],
        True,
    ),
    (
        "a statement given as an object, not a list",
        {"Version": "2012-10-17",
         "Statement": _stmt("Deny", Q + "*", action="rabbitmq:QueueDelete")},
        [
            ("rabbitmq:QueueDelete", Q + "orders.eu", DENIED),
            ("rabbitmq:QueuePurge", Q + "orders.eu", NEUTRAL),
        ],
        True,
    ),
    # --- moto deviates from AWS below: the gateway is checked against AWS's documentation.
    (
        # IAM: "NotResource ... matches everything except the listed resources".
        "NotResource with Allow",
        _doc(_stmt("Allow", not_resource=Q + "audit.*", action="rabbitmq:Publish")),
        [
            ("rabbitmq:Publish", Q + "orders.eu", PERMITTED),
            ("rabbitmq:Publish", Q + "audit.x", NEUTRAL),
            ("rabbitmq:Get", Q + "orders.eu", NEUTRAL),
        ],
        False,
    ),
    (
        "NotResource with Deny: everything outside vhost prod is denied",
        _doc(
            _stmt("Allow", "*", action="rabbitmq:*"),
            _stmt("Deny", not_resource=[PREFIX + "vhost/prod", PREFIX + "vhost/prod/*"],
                  action="rabbitmq:*"),
        ),
        [
            ("rabbitmq:Publish", Q + "orders.eu", PERMITTED),
            ("rabbitmq:Connect", PREFIX + "vhost/prod", PERMITTED),
            ("rabbitmq:Publish", Q_ROOT + "orders.eu", DENIED),
            ("rabbitmq:Connect", PREFIX + "vhost/%2F", DENIED),
        ],
        False,
    ),
    (
        # IAM: `?` matches exactly one character, in resources and in actions.
        "the `?` wildcard",
        _doc(
            _stmt("Allow", Q + "orders.??", action="rabbitmq:Publish"),
            _stmt("Allow", "*", action="rabbitmq:Ge?"),
        ),
        [
            ("rabbitmq:Publish", Q + "orders.eu", PERMITTED),
            ("rabbitmq:Publish", Q + "orders.e", NEUTRAL),
            ("rabbitmq:Publish", Q + "orders.eux", NEUTRAL),
            ("rabbitmq:Get", Q + "audit.x", PERMITTED),
        ],
        False,
    ),
    (
        # IAM: "the prefix and the action name are case insensitive".
        "action names are case-insensitive",
        _doc(_stmt("Allow", "*", action=["RABBITMQ:publish", "rabbitmq:queue*"])),
        [
            ("rabbitmq:Publish", Q + "orders.eu", PERMITTED),
            ("rabbitmq:QueueBind", Q + "orders.eu", PERMITTED),
            ("rabbitmq:Get", Q + "orders.eu", NEUTRAL),
        ],
        False,
    ),
    (
        # IAM matches everything but `*` and `?` literally; moto reads `.` as a regex.
        "`.` is not a wildcard",
        _doc(_stmt("Allow", Q + "orders.eu", action="rabbitmq:Publish")),
        [
            ("rabbitmq:Publish", Q + "orders.eu", PERMITTED),
            ("rabbitmq:Publish", Q + "orders-eu", NEUTRAL),
        ],
        False,
    ),
]


@pytest.mark.parametrize("name,policy,cases,moto_follows_aws", TABLE, ids=[t[0] for t in TABLE])
def test_table(sim: Simulator, name, policy, cases, moto_follows_aws):
    results = sim.decide(policy, [(a, r) for a, r, _ in cases])
    problems = []
    for (action, resource, expected), result in zip(cases, results):
        got, _ = ours(result, policy)
        if got != expected:
            problems.append(
                f"{action} on {resource}: expected {expected.name} (AWS), gateway "
                f"{got.name} ({result['decided_by']})"
            )
        if moto_follows_aws:
            assert IAMPolicy(json.dumps(policy)).is_action_permitted(action, resource) \
                == expected, f"the table disagrees with moto: {action} on {resource}"
            problem = compare(policy, (action, resource), result)
            if problem and got == expected:
                problems.append(problem)
    assert not problems, f"{name}:\n" + "\n".join(problems)


def test_moto_deviations_still_hold():
    """The exclusions above rest on these answers of moto; if a moto upgrade changes one,
    the comparison can be widened."""
    allow_nr = json.dumps(_doc(_stmt("Allow", not_resource=Q + "audit.*",
                                     action="rabbitmq:Publish")))
    assert IAMPolicy(allow_nr).is_action_permitted("rabbitmq:Publish", Q + "audit.x") \
        == PERMITTED  # AWS: implicit deny
    deny_nr = json.dumps(_doc(_stmt("Deny", not_resource=PREFIX + "vhost/prod/*",
                                    action="rabbitmq:*")))
    assert IAMPolicy(deny_nr).is_action_permitted("rabbitmq:Publish", Q_ROOT + "x") \
        == PERMITTED  # AWS: explicit deny
    qmark = json.dumps(_doc(_stmt("Allow", Q + "orders.??", action="rabbitmq:Publish")))
    assert IAMPolicy(qmark).is_action_permitted("rabbitmq:Publish", Q + "orders.eu") \
        == NEUTRAL  # AWS: allowed
    case = json.dumps(_doc(_stmt("Allow", "*", action="RABBITMQ:publish")))
    assert IAMPolicy(case).is_action_permitted("rabbitmq:Publish", Q + "orders.eu") \
        == NEUTRAL  # AWS: allowed
    dot = json.dumps(_doc(_stmt("Allow", Q + "orders.eu", action="rabbitmq:Publish")))
    assert IAMPolicy(dot).is_action_permitted("rabbitmq:Publish", Q + "orders-eu") \
        == PERMITTED  # AWS: implicit deny
    # The screen sees the last two.
    assert moto_deviations(json.loads(case), "rabbitmq:Publish", Q + "orders.eu")
    assert moto_deviations(json.loads(dot), "rabbitmq:Publish", Q + "orders-eu")
    assert not moto_deviations(json.loads(dot), "rabbitmq:Publish", Q + "orders.eu")


# --------------------------------------------------------------------------------------
# malformed documents: both validators must reject them

GOOD = _stmt("Allow", Q + "orders.eu", action="rabbitmq:Publish")


def _with(**changes) -> dict:
    st = dict(GOOD)
    for k, v in changes.items():
        if v is None:
            st.pop(k, None)
        else:
            st[k] = v
    return st


# (name, document text, what the gateway's message must contain)
MALFORMED = [
    ("not JSON", '{"Version": "2012-10-17", "Statement": [', None),
    ("unknown version", json.dumps({"Version": "2011-01-01", "Statement": [GOOD]}),
     "$.Version"),
    ("no Statement", json.dumps({"Version": "2012-10-17"}), "no Statement"),
    ("empty Statement list", json.dumps({"Version": "2012-10-17", "Statement": []}),
     "$.Statement"),
    ("Statement is a string", json.dumps({"Version": "2012-10-17", "Statement": "x"}),
     "$.Statement"),
    ("unknown top-level element",
     json.dumps({"Version": "2012-10-17", "Statements": [GOOD]}), "$.Statements"),
    ("Effect in lower case", json.dumps(_doc(_with(Effect="allow"))),
     "$.Statement[0].Effect"),
    ("no Effect", json.dumps(_doc(_with(Effect=None))), "no Effect"),
    ("no Action", json.dumps(_doc(_with(Action=None))), "no Action"),
    ("no Resource", json.dumps(_doc(_with(Resource=None))), "no Resource"),
    ("Action and NotAction", json.dumps(_doc(_with(NotAction="rabbitmq:Get"))),
     "not both"),
    ("Resource and NotResource", json.dumps(_doc(_with(NotResource="*"))), "not both"),
    ("unknown statement element", json.dumps(_doc(_with(Actions="rabbitmq:Get"))),
     "$.Statement[0].Actions"),
    ("empty Action list", json.dumps(_doc(_with(Action=[]))), "$.Statement[0].Action"),
    ("empty Resource list", json.dumps(_doc(_with(Resource=[]))),
     "$.Statement[0].Resource"),
    ("action without a vendor", json.dumps(_doc(_with(Action="Publish"))),
     "$.Statement[0].Action"),
    ("action with two colons", json.dumps(_doc(_with(Action="rabbitmq:Publish:x"))),
     "$.Statement[0].Action"),
    ("resource not an ARN", json.dumps(_doc(_with(Resource="vhost/prod/queue/x"))),
     "$.Statement[0].Resource"),
    ("Sid used twice", json.dumps(_doc(_with(Sid="A"), _with(Sid="A"))), "twice"),
    ("Sid not a string", json.dumps(_doc(_with(Sid=5))), "$.Statement[0].Sid"),
    ("Condition not an object", json.dumps(_doc(_with(Condition="x"))),
     "$.Statement[0].Condition"),
]


def test_malformed_documents_rejected_by_both(sim: Simulator):
    # The well-formed base passes both.
    base = json.dumps(_doc(GOOD))
    IAMPolicyDocumentValidator(base).validate()
    ok = sim.check_config(base)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    problems = []
    for name, text, where in MALFORMED:
        try:
            IAMPolicyDocumentValidator(text).validate()
            problems.append(f"{name}: moto accepts it (the case does not belong here)")
        except MalformedPolicyDocument:
            pass
        r = sim.check_config(text)
        out = r.stdout + r.stderr
        if r.returncode == 0:
            problems.append(f"{name}: check-config accepts it")
        elif POLICY_FILE not in out or (where is not None and where not in out):
            problems.append(f"{name}: check-config rejects it, but not naming {where!r}:\n{out}")
    assert not problems, "\n".join(problems)
