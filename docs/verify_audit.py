#!/usr/bin/env python3
"""Check a fedq ledger's audit log without fedq: the SHA3-256 chain, its recorded head, and
the budgets, charges, stored answers, users and policy hash against what the entries record.
Usage: python3 verify_audit.py LEDGER.sqlite [ANCHOR]. Prints `ok N HEAD`, or `BAD reason`
and exits 1. Standard library only; reads the file read-only, in one transaction."""
import hashlib, json, sqlite3, sys

def verify(path, anchor=None):
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    db.execute("BEGIN")  # one snapshot, however much the coordinator writes meanwhile
    q = lambda sql: db.execute(sql).fetchall()
    meta = dict(q("SELECT key, value FROM meta"))
    tables = {"budgets": {(k, n): list(r) for k, n, *r in q("SELECT kind, name, epsilon_granted, delta_granted, "
                          "epsilon_spent, delta_spent, renewal_ms, period_start, revoked FROM budgets")},
              "charges": {r[0]: [r[1], json.loads(r[2]), *r[3:]] for r in q("SELECT query_id, researcher, datasets, "
                          "plan_hash, epsilon, delta, state, charged_at, settled_at FROM charges")},
              "replays": {(r, p): [i, hashlib.sha3_256(b).hexdigest(), t] for r, p, i, b, t in
                          q("SELECT researcher, plan_hash, query_id, result, created_at FROM replays")},
              "users": {n: [r, hashlib.sha3_256(h.encode()).hexdigest(), d] for n, r, h, d in
                        q("SELECT name, role, password_hash, disabled FROM users")},
              "policy": {"hash": meta.get("policy_hash")}}
    chain = {"budgets": {}, "charges": {}, "replays": {}, "users": {}, "policy": {"hash": None}}
    head, rows = "0" * 64, q("SELECT * FROM audit ORDER BY seq")
    for n, (seq, entry, prev, h) in enumerate(rows, 1):
        if seq != n or prev != head or json.loads(entry)["seq"] != n:
            return f"entry {n} is missing, moved or does not follow entry {n - 1}"
        if hashlib.sha3_256(f"{prev}\n{entry}".encode()).hexdigest() != h:
            return f"entry {seq} does not match its hash: it was modified"
        e, head = json.loads(entry), h
        kind, body = e["kind"], e["body"]
        for b in body.get("budgets_after", []) + ([body["after"]] if "after" in body else []):
            chain["budgets"][(b["kind"], b["name"])] = [int(b[f"{x}_{y}"]) for y in ("granted", "spent") for x in
                ("epsilon", "delta")] + [b["renewal_ms"], b["period_start_ms"], int(b["revoked"])]
        if kind == "query.charged":
            c = body["charge"]
            chain["charges"][c["query_id"]] = [c["researcher"], c["datasets"], c["plan_hash"], int(c["epsilon"]),
                                               int(c["delta"]), "charged", c["charged_at_ms"], None]
        if kind in ("query.released", "query.failed_after_data", "query.refunded"):
            c = chain["charges"].get(body["query_id"])
            if c is None or c[5] != "charged":
                return f"entry {seq} settles a charge that is not outstanding"
            c[5], c[7] = "refunded" if kind == "query.refunded" else "released", body["settled_at_ms"]
        if kind == "query.released":
            chain["replays"].setdefault((body["researcher"], body["plan_hash"]), [body["query_id"],
                                        body["stored"]["sha3"], body["stored"]["created_at_ms"]])
        if kind == "answers.pruned":
            chain["replays"] = {k: v for k, v in chain["replays"].items() if v[2] >= body["older_than_ms"]}
        if kind == "policy.changed":
            chain["policy"]["hash"] = body["hash"]
        if kind == "user.added":
            chain["users"][body["name"]] = [body["role"], body["password_fingerprint"], 0]
        if kind in ("user.disabled", "user.enabled"):
            chain["users"][body["name"]][2] = int(kind == "user.disabled")
    if (meta.get("audit_count", "0"), meta.get("audit_head", "0" * 64)) != (str(len(rows)), head):
        return "the ledger records another chain length or head: entries at the end were deleted"
    if anchor and anchor != "0" * 64 and anchor not in {r[0] for r in q("SELECT hash FROM audit")}:
        return "the anchored head is not in this chain: the log was rewritten since it was anchored"
    for t in tables:
        for k in sorted(set(tables[t]) | set(chain[t]), key=str):
            if tables[t].get(k) != chain[t].get(k):
                return f"{t} {k}: the table holds {tables[t].get(k)}, the audit log {chain[t].get(k)}"
    return None

if __name__ == "__main__":
    bad = verify(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
    print(f"BAD {bad}" if bad else "ok")
    sys.exit(1 if bad else 0)
