"""Issue 15, item 3: configuration changes to destinations (modify, deidentify included) and to a
rule's modify are audited with who and why, and, with ``governance: two_person``, take effect only
after a second admin (a different user) approves them through the API or the CLI; a file edited
by hand and SIGHUP'd does not bypass that."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

import peers
import synth
from fastroute import governance
from fastroute.config import Config, load, loads
from fastroute.ops import actions as ops
from fastroute.ops import proposals as gov
from fastroute.ops.api import make_app
from fastroute.ops.auth import hash_token
from fastroute.spool import Spool
from fastroute.spool.proposals import ProposalState
from router import Router, destination
from test_ops import Hup, config_text

TOKENS = {"ada": "frt_admin-one-token-0123456789abcdef", "alan": "frt_admin-two-token-0123456789abcdef",
          "vera": "frt_viewer-token-0123456789abcdef"}
ROLES = {"ada": "admin", "alan": "admin", "vera": "viewer"}
RESEARCH = """\
  research:
    ae_title: AI
    host: 127.0.0.1
    port: 1
    deidentify: {profile: basic, options: [retain-longitudinal-modified-dates], key: "env:GOV_TEST_KEY"}
"""


@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    return {name: hash_token(token) for name, token in TOKENS.items()}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def governed_text(spool: Path, hashes: dict[str, str], governance: str = "two_person") -> str:
    users = "\n".join(f"    {n}: {{role: {ROLES[n]}, token_hash: \"{h}\"}}" for n, h in hashes.items())
    text = config_text(spool, token=None).replace("http: {host: 127.0.0.1}\n",
                                                  f"http:\n  host: 127.0.0.1\n  users:\n{users}\n")
    return f"governance: {governance}\n" + text


@pytest.fixture
def env(tmp_path: Path, hashes: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Config, Path, Spool]]:
    monkeypatch.setenv("GOV_TEST_KEY", "k" * 32)
    path = tmp_path / "router.yaml"
    path.write_text(governed_text(tmp_path / "spool", hashes))
    cfg = load(path)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes)
    (cfg.spool / "run").mkdir(exist_ok=True)
    (cfg.spool / "run" / "supervisor.pid").write_text(str(os.getpid()))   # this process takes the SIGHUP
    yield cfg, path, spool
    spool.close()


def events(spool: Spool, action: str) -> list[dict[str, Any]]:
    return [e for e in spool.audit_events() if e["action"] == action]


# -- what is governed ---------------------------------------------------------------------------

def test_governed_sections_are_named_and_the_rest_is_not_governed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOV_TEST_KEY", "k" * 32)
    base = "governance: two_person\ndestinations:\n  pacs: {ae_title: PACS, host: 127.0.0.1, port: 104}\n"
    rules = "rules:\n  - {name: ct, match: {Modality: CT}, send_to: [pacs]}\n"
    old = loads(base + rules)

    def diff(text: str) -> governance.GovernedDiff:
        return governance.compare(old, loads(text))

    assert diff(base + rules + "log_level: DEBUG\n").changes == ()          # ungoverned
    assert not diff(base + rules.replace("CT", "MR")).needs_approval        # matching is not governed
    added = diff(base + RESEARCH + rules)
    assert added.changes == ("destinations.research (added)",) and added.needs_approval
    assert added.new_digest != added.old_digest
    moved = diff(base.replace("port: 104", "port: 105") + rules)
    assert moved.changes == ("destinations.pacs.port",)
    modified = diff(base + rules.replace("send_to: [pacs]}",
                                         "send_to: [pacs], modify: [{set: {InstitutionName: GH}}]}"))
    assert modified.changes == ("rules[ct].modify",)
    dest_modify = diff(base.replace("port: 104}", "port: 104, modify: [{delete: PatientComments}]}") + rules)
    assert dest_modify.changes == ("destinations.pacs.modify",)
    off = diff(base.replace("two_person", "off") + rules)
    assert off.changes == ("governance",) and off.needs_approval           # switching it off is governed
    # the same governed part digests the same however the text is laid out
    again = loads("log_level: ERROR\n" + rules + base)
    assert governance.compare(old, again).old_digest == governance.compare(old, again).new_digest
    # with governance off, nothing needs approval, but the changes are still named
    plain = loads(base.replace("two_person", "off") + rules)
    assert plain.governance == "off"                    # a bare YAML off (a boolean) reads as "off"
    assert not governance.compare(plain, loads(base.replace("two_person", "off") + RESEARCH + rules)).needs_approval


def test_an_approval_is_for_one_change_from_one_configuration(env: Any) -> None:
    cfg, path, spool = env
    running = path.read_text()
    made = gov.propose(cfg, spool, str(path), running.replace("port: 1}", "port: 3}"), who="ada")["proposal"]
    assert spool.proposals.approved_for(made["digest"], made["base_digest"]) is None       # pending
    spool.proposals.decide(made["id"], ProposalState.PENDING, ProposalState.APPROVED, decided_by="alan")
    assert spool.proposals.approved_for(made["digest"], made["base_digest"]).id == made["id"]  # type: ignore[union-attr]
    assert spool.proposals.approved_for(made["digest"], "sha256:another-running-config") is None
    assert spool.proposals.approved_for(made["base_digest"], made["base_digest"]) is None
    assert spool.proposals.get("0001").id == made["id"] and spool.proposals.get("x1") is None   # type: ignore[union-attr]


def test_the_plain_reload_refuses_a_governed_change_under_two_person(env: Any) -> None:
    """``actions.reload_config`` on its own (not through ``proposals.reload``) never applies it."""
    cfg, path, spool = env
    running = path.read_text()
    with Hup() as hup:
        with pytest.raises(ops.Conflict, match=r"touches destinations\.research \(added\).*second admin"):
            ops.reload_config(cfg, spool, str(path), text=running.replace("destinations:\n", "destinations:\n" + RESEARCH),
                              applied_text=running, who="ada")
    assert path.read_text() == running and hup.count == 0 and not events(spool, "config_change")


# -- the API, two admins ------------------------------------------------------------------------

def serve(cfg: Config, spool: Spool, path: Path, body: Callable[[TestClient], Any]) -> None:  # type: ignore[type-arg]
    async def main() -> None:
        app = make_app(cfg, spool, str(path), monitor_interval=60)
        async with TestClient(TestServer(app)) as client:
            await body(client)
    asyncio.run(main())


def test_api_proposal_needs_a_second_admin(env: Any) -> None:
    cfg, path, spool = env
    running = path.read_text()
    new = running.replace("destinations:\n", "destinations:\n" + RESEARCH)
    with Hup() as hup:
        async def body(c: TestClient) -> None:   # type: ignore[type-arg]
            # An ungoverned change applies at once, audited, naming no governed section.
            quieter = running.replace("consecutive_failures: 3", "consecutive_failures: 4")
            resp = await c.post("/api/config/reload", json={"text": quieter, "why": "fewer pages"}, headers=bearer("ada"))
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["governed_changes"] == []
            await poll(lambda: hup.count == 1, "SIGHUP for the ungoverned change")
            path.write_text(running)

            # A new destination: proposed, not applied; the file and the supervisor untouched.
            resp = await c.post("/api/config/reload", json={"text": new, "why": "AI study 42"}, headers=bearer("ada"))
            assert resp.status == 202, await resp.text()
            doc = await resp.json()
            pid = doc["proposal"]["id"]
            assert not doc["applied"] and doc["proposed"] and doc["proposal"]["state"] == "pending"
            assert doc["proposal"]["governed_changes"] == ["destinations.research (added)"]
            assert doc["proposal"]["who"] == "ada" and "+  research:" in doc["proposal"]["diff"]
            assert path.read_text() == running and hup.count == 1

            listed = await (await c.get("/api/config/proposals?state=pending", headers=bearer("alan"))).json()
            assert [p["id"] for p in listed["proposals"]] == [pid] and listed["proposals"][0]["text"] == new
            # A viewer may not see or decide proposals; the proposer may not approve their own.
            assert (await c.get("/api/config/proposals", headers=bearer("vera"))).status == 403
            resp = await c.post(f"/api/config/proposals/{pid}/approve", json={"why": "ok"}, headers=bearer("vera"))
            assert resp.status == 403 and "needs admin" in (await resp.json())["error"]
            resp = await c.post(f"/api/config/proposals/{pid}/approve", json={"why": "mine"}, headers=bearer("ada"))
            assert resp.status == 403
            assert "a second admin, a different user, must approve it" in (await resp.json())["error"]
            resp = await c.post(f"/api/config/proposals/{pid}/approve", json={}, headers=bearer("alan"))
            assert resp.status == 400 and "reason" in (await resp.json())["error"]
            assert path.read_text() == running and hup.count == 1

            # The second admin approves: written, signalled, audited with both names.
            resp = await c.post(f"/api/config/proposals/{pid}/approve", json={"why": "IRB 42 approved"},
                                headers=bearer("alan"))
            assert resp.status == 200, await resp.text()
            doc = await resp.json()
            assert doc["proposal"]["state"] == "approved" and doc["proposal"]["decided_by"] == "alan"
            await poll(lambda: hup.count == 2, "SIGHUP after the approval")
            assert path.read_text() == new
            resp = await c.post(f"/api/config/proposals/{pid}/approve", json={"why": "again"}, headers=bearer("alan"))
            assert resp.status == 409 and "already approved" in (await resp.json())["error"]

            # Another proposal, rejected.
            resp = await c.post("/api/config/reload", json={"text": running.replace("governance: two_person",
                                                                                    "governance: off"),
                                                            "why": "too slow"}, headers=bearer("alan"))
            assert resp.status == 202
            other = (await resp.json())["proposal"]
            assert other["governed_changes"] == ["governance"]
            resp = await c.post(f"/api/config/proposals/{other['id']}/reject", json={"why": "policy"},
                                headers=bearer("ada"))
            assert resp.status == 200 and (await resp.json())["proposal"]["state"] == "rejected"
            assert (await c.post("/api/config/proposals/99/approve", json={"why": "x"},
                                 headers=bearer("alan"))).status == 404
        serve(cfg, spool, path, body)

    change = events(spool, "config_change")
    assert [(e["who"], e["why"], e["governed_changes"]) for e in change] == [("ada", "fewer pages", [])]
    proposed = events(spool, "config_proposed")
    assert [(e["who"], e["why"], e["governed_changes"]) for e in proposed] == [
        ("ada", "AI study 42", ["destinations.research (added)"]), ("alan", "too slow", ["governance"])]
    approved = events(spool, "config_approved")
    assert [(e["who"], e["why"], e["proposed_by"], e["proposal"]) for e in approved] == [
        ("alan", "IRB 42 approved", "ada", proposed[0]["proposal"])]
    assert "+  research:" in approved[0]["diff"]
    assert [(e["who"], e["why"]) for e in events(spool, "config_rejected")] == [("ada", "policy")]
    assert spool.audit_verify()[0]


async def poll(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_stale_proposal_and_legacy_token_cannot_be_approved(env: Any, tmp_path: Path) -> None:
    cfg, path, spool = env
    running = path.read_text()
    first = gov.propose(cfg, spool, str(path), running.replace("port: 1, query", "port: 2, query"), who="ada")
    second = gov.propose(cfg, spool, str(path), running.replace("port: 1}", "port: 3}"), who="ada")
    with Hup():
        gov.approve(cfg, spool, str(path), first["proposal"]["id"], who="alan", why="new pacs port")
        moved = load(path)   # what the supervisor now runs
        with pytest.raises(ops.Conflict, match="has changed since"):
            gov.approve(moved, spool, str(path), second["proposal"]["id"], who="alan", why="vna port")
    assert load(path).destinations["vna"].port == 1
    # The deprecated shared token is one credential for everyone: it may not approve.
    text = running.replace("http:\n  host: 127.0.0.1\n", "http:\n  host: 127.0.0.1\n  token: s3cret\n")
    legacy = loads(text, str(path))

    async def body(c: TestClient) -> None:   # type: ignore[type-arg]
        resp = await c.post(f"/api/config/proposals/{second['proposal']['id']}/approve", json={"why": "x"},
                            headers={"Authorization": "Bearer s3cret"})
        assert resp.status == 403 and "two users of their own" in (await resp.json())["error"]
    serve(legacy, spool, path, body)


# -- end to end: the supervisor, a hand-edited file, the CLI as two OS users ---------------------

def cli(r: Router, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "USER": user, "LOGNAME": user}
    return subprocess.run([sys.executable, "-m", "fastroute", "config", *args, "-c", str(r.path)],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.peers
def test_sighup_with_an_unapproved_governed_change_is_refused_and_routing_continues(
        router: Callable[..., Router], storescp: Callable[..., peers.StoreSCP], tmp_path: Path) -> None:
    old_pacs, new_pacs = storescp("PACS"), storescp("PACS")
    r = router({"governance": "two_person", "destinations": {"pacs": destination(old_pacs.port, "PACS")},
                "rules": [{"name": "all", "match": None, "send_to": ["pacs"]}]})
    running = r.path.read_text()

    # Someone edits the file (the PACS moved) and sends SIGHUP: refused, the old one keeps routing.
    r.write_config(destinations={"pacs": destination(new_pacs.port, "PACS")})
    edited = r.path.read_text()
    assert r.proc is not None
    os.kill(r.proc.pid, 1)
    peers.wait_until(lambda: "reload refused, keeping the running configuration: governance is two_person"
                     in r.log_text(), 30, message=lambda: r.log_tail())
    assert "destinations.pacs.port" in r.log_text()
    files = synth.make_tiny(tmp_path / "s1", n=2)
    assert peers.storescu(r.port, files).returncode == 0
    peers.wait_until(lambda: len(old_pacs.files()) == 2, 30, message=lambda: r.log_tail())
    assert new_pacs.files() == []

    # An ungoverned change with the file otherwise as running applies.
    r.path.write_text(running.replace("shutdown_grace: 5", "shutdown_grace: 6"))
    os.kill(r.proc.pid, 1)
    peers.wait_until(lambda: r.log_text().count("reload applied") == 1, 30, message=lambda: r.log_tail())

    # Proposed by one OS user, refused to the same one, approved by another: applied.
    proposal_file = tmp_path / "new.yaml"
    proposal_file.write_text(edited.replace("shutdown_grace: 5", "shutdown_grace: 6"))
    res = cli(r, "alice", "propose", "--file", str(proposal_file), "--reason", "PACS moved to the new server")
    assert res.returncode == 0, res.stderr
    assert "proposal 1 by alice@" in res.stdout and "destinations.pacs.port" in res.stdout
    listed = json.loads(cli(r, "bob", "proposals", "--json").stdout)
    assert [(p["id"], p["state"]) for p in listed] == [("1", "pending")]
    res = cli(r, "alice", "approve", "1", "--reason", "mine")
    assert res.returncode == 1 and "a second admin, a different user, must approve it" in res.stderr
    res = cli(r, "bob", "approve", "1", "--reason", "change ticket 77")
    assert res.returncode == 0, res.stderr
    assert "proposal 1 (by alice@" in res.stdout and "approved by bob@" in res.stdout
    peers.wait_until(lambda: r.log_text().count("reload applied") == 2, 30, message=lambda: r.log_tail())
    peers.wait_until(lambda: json.loads(cli(r, "bob", "proposals", "--json").stdout)[0]["state"] == "applied", 30)
    files = synth.make_tiny(tmp_path / "s2", n=3)
    assert peers.storescu(r.port, files).returncode == 0
    peers.wait_until(lambda: len(new_pacs.files()) == 3, 30, message=lambda: r.log_tail())
    assert len(old_pacs.files()) == 2

    audit = [json.loads(line) for line in r.cli("audit").stdout.splitlines()]
    refused = [e for e in audit if e["action"] == "config_change_refused"]
    assert len(refused) == 1 and refused[0]["governed_changes"] == ["destinations.pacs.port"]
    applied = [e for e in audit if e["action"] == "config_applied"]
    assert [(e["proposal"], e["governed_changes"]) for e in applied] == [("1", ["destinations.pacs.port"])]
    assert [e["who"].split("@")[0] for e in audit if e["action"] in ("config_proposed", "config_approved")] == \
        ["alice", "bob"]
    assert yaml.safe_load(r.path.read_text())["destinations"]["pacs"]["port"] == new_pacs.port
