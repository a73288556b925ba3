"""Keys are built in one place, carry one hash tag per account, and the scripts touch no
key they were not given (so they run unchanged on Redis Cluster)."""

from __future__ import annotations

import re
from importlib import resources

import pytest
from redis.crc import key_slot

from gateway.admission.keys import Keys, owner_id

SCRIPTS = [
    *(("gateway.admission", s) for s in ["acquire", "release", "refresh", "usage", "renew"]),
    *(("gateway.products.transcripts", s) for s in ["create", "claim", "requeue", "update", "end", "heard"]),
]
# Commands that take no key.
KEYLESS = {"TIME"}


def test_exact_key_strings() -> None:
    k = Keys(prefix="aai", account="acme")
    assert k.leases("llm:gpt-5") == "aai:{acme}:leases:llm:gpt-5"
    assert k.wait("requests") == "aai:{acme}:wait:requests"
    assert k.dead("async") == "aai:{acme}:dead:async"
    assert k.resv("streaming") == "aai:{acme}:resv:streaming"
    assert k.seq == "aai:{acme}:seq"
    assert k.tomb("abc.1f") == "aai:{acme}:tomb:abc.1f"
    assert k.channel == "aai:{acme}:wake"
    assert k.ledger("2026-11-26") == "aai:{acme}:ledger:2026-11-26"
    assert k.streaming_token("ab12") == "aai:{acme}:stoken:ab12"
    assert k.share_dead == "aai:{acme}:share:dead"
    assert k.share_owner == "aai:{acme}:share:owner"
    assert k.share_lex == "aai:{acme}:share:lex"


def test_every_key_of_an_account_is_on_one_cluster_slot() -> None:
    k = Keys(prefix="aai", account="acme")
    keys = [
        k.leases("llm:gpt-5"),
        k.wait("requests"),
        k.dead("x"),
        k.resv("y"),
        k.seq,
        k.tomb("t"),
        k.channel,
        k.ledger("2026-11-26"),
        k.streaming_token("fp"),
        k.share_dead,
        k.share_owner,
        k.share_lex,
    ]
    assert len({key_slot(key.encode()) for key in keys}) == 1
    other = Keys(prefix="aai", account="other-account")
    assert key_slot(other.seq.encode()) != key_slot(k.seq.encode()) or other.seq != k.seq


@pytest.mark.parametrize("bad", ["", "a{b", "a}b", "a b", "a\nb"])
def test_account_names_that_would_break_the_hash_tag_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        Keys(account=bad)


def _script(script: tuple[str, str]) -> str:
    package, name = script
    return resources.files(package).joinpath("lua", f"{name}.lua").read_text()


@pytest.mark.parametrize("script", SCRIPTS, ids=[s[1] for s in SCRIPTS])
def test_scripts_touch_only_declared_keys(script: tuple[str, str]) -> None:
    """Every redis.call names its key through KEYS (directly, or through a local defined
    from KEYS in the same script): Cluster refuses anything else."""
    name = script[1]
    source = "\n".join(line.split("--", 1)[0] for line in _script(script).splitlines())
    key_names = {"KEYS"}
    for local, expr in re.findall(r"local function (\w+)\(\w*\) return (\S+)", source):
        if expr.startswith("KEYS["):
            key_names.add(local)
    for locals_, _exprs in re.findall(r"local ((?:\w+, )*\w+) = ((?:KEYS\[[^\]]+\],? ?)+)", source):
        key_names.update(n.strip() for n in locals_.split(","))
    # Helpers that take a key as their first parameter (``extend(key, ms)``): the parameter
    # counts as a key inside them, and every call of them must pass a key from KEYS.
    helpers = dict(re.findall(r"local function (\w+)\((\w+),", source))
    for helper, param in helpers.items():
        key_names.add(param)
        for arg in re.findall(rf"(?<![\w.]){helper}\(\s*([^,)]+)", source):
            if arg.strip() == param:
                continue  # the definition itself
            head = re.match(r"[A-Za-z_]\w*", arg.strip())
            assert head and head.group(0) in key_names - {param}, f"{name}.lua: {helper}({arg}) not from KEYS"
    calls = re.findall(r"redis\.call\(\s*([^,)]+)\s*(?:,\s*([^,)]+))?", source)
    assert calls, "no redis.call found"
    for command, first_arg in calls:
        command = command.strip()
        if command.strip("'\"") in KEYLESS:
            continue
        assert first_arg, f"{name}.lua: {command} without a key"
        head = re.match(r"[A-Za-z_]\w*", first_arg.strip())
        assert head and head.group(0) in key_names, f"{name}.lua: {command} on {first_arg!r}, not from KEYS"


@pytest.mark.parametrize("script", SCRIPTS, ids=[s[1] for s in SCRIPTS])
def test_scripts_open_with_their_contract(script: tuple[str, str]) -> None:
    head = _script(script).split("\n\n", 1)[0]
    assert "KEYS" in head and "ARGV" in head and "Returns" in head


def test_owner_ids_are_plain_tokens_or_hashes() -> None:
    """An owner goes into Redis members and ZLEXCOUNT ranges (``<owner>\\t<ticket>``): a hex
    fingerprint is kept as it is; anything else is hashed, so no owner can carry a tab, a
    range bracket or a newline into them, and a hashed owner never equals a plain one."""
    fp = "0123456789abcdef" * 4
    assert owner_id(fp) == fp
    assert owner_id("token") == "token"
    for odd in ["", "a\tb", "a b", "x" * 129, "[a", "é", "a\nb", "~" + "0" * 32]:
        got = owner_id(odd)
        assert got.startswith("~") and len(got) == 33 and got != odd
        assert all(c in "~0123456789abcdef" for c in got)
    assert owner_id("a\tb") != owner_id("a b")
