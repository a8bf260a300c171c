"""A real Flight SQL client (ADBC + pyarrow) against a running fedq federation.

The fixture starts `fedq demo --serve` (5 synthetic sites on loopback, coordinator on a free
port) and reads the connection details it writes once ready.
"""

import json
import math
import os
import signal
import subprocess
import tempfile
import time

import adbc_driver_flightsql
import adbc_driver_flightsql.dbapi as flightsql
import pyarrow as pa
import pytest

FEDQ_BIN = os.environ.get("FEDQ_BIN", "target/debug/fedq")


def serve_demo(*extra, sites="3", participants="3000"):
    """Start `fedq demo --serve`; yield its connection details, then stop it."""
    tmp = tempfile.mkdtemp(prefix="fedq-pytest-")
    ready = os.path.join(tmp, "ready.json")
    proc = subprocess.Popen(
        [
            FEDQ_BIN, "demo", "--serve", "--sites", sites, "--participants", participants,
            "--listen", "127.0.0.1:0", "--dir", os.path.join(tmp, "fed"),
            "--ready-file", ready, *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 300
    while not os.path.exists(ready):
        if proc.poll() is not None:
            raise RuntimeError("fedq demo exited: " + proc.stderr.read().decode())
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("fedq demo did not become ready in 300 s")
        time.sleep(0.2)
    time.sleep(0.2)
    with open(ready) as f:
        info = json.load(f)
    yield info
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def federation():
    yield from serve_demo()


@pytest.fixture(scope="module")
def tls_federation():
    """The researcher endpoint over TLS (`[researcher_tls]`), a smaller federation."""
    yield from serve_demo("--researcher-tls", sites="2", participants="400")


def connect(info, user=None, password=None):
    """Log in with a user name and password: the driver's Flight handshake (Basic) returns
    a bearer token that it sends on every later call."""
    return flightsql.connect(
        info["grpc"],
        db_kwargs={
            "username": user or info["user"],
            "password": password if password is not None else info["password"],
        },
    )


def connect_with_header(info, header):
    return flightsql.connect(
        info["grpc"],
        db_kwargs={adbc_driver_flightsql.DatabaseOptions.AUTHORIZATION_HEADER.value: header},
    )


def test_grouped_query_with_epsilon_and_noise_metadata(federation):
    with connect(federation) as conn:
        cur = conn.cursor()
        cur.execute("SET fedq.epsilon = 0.5")
        assert "0.5" in cur.fetchall()[0][0]
        cur.execute(
            "SELECT sex, COUNT(*) AS n, AVG(birth_year) AS mean_birth_year "
            "FROM participants GROUP BY sex ORDER BY sex"
        )
        table = cur.fetch_arrow_table()
        assert isinstance(table, pa.Table)
        assert table.column("sex").to_pylist() == ["F", "M"]

        n_field = table.schema.field("n")
        md = {k.decode(): v.decode() for k, v in (n_field.metadata or {}).items()}
        # COUNT(*) over participants: R = 1, S = 2 sites per participant. ε = 0.5, less the
        # 1/20 of the bounding report, is split over COUNT(*), the centred SUM and
        # COUNT(birth_year) in proportion to the cube roots of their allocation weights 1,
        # 3/4 and 1/4 (rounded to 1e-9, as fedq does).
        weights = [round(w ** (1 / 3) * 1e9) for w in (1.0, 0.75, 0.25)]
        share = 0.5 * (19 / 20) * weights[0] / sum(weights)
        assert md["fedq.statistic"] == "count"
        assert math.isclose(float(md["fedq.noise_scale"]), 2 / share, rel_tol=1e-9)
        assert float(md["fedq.ci95_half_width"]) > 0

        avg_md = {k.decode(): v.decode() for k, v in (table.schema.field("mean_birth_year").metadata or {}).items()}
        assert avg_md["fedq.statistic"] == "avg"
        per_row = json.loads(avg_md["fedq.ci95_half_width"])
        assert len(per_row) == 2 and all(x is None or x > 0 for x in per_row)

        smd = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        assert smd["fedq.epsilon_spent"] == "0.5"
        assert len(smd["fedq.sites_answered"].split(",")) == 3
        # The bounding report: R = 1 for participants, and a noisy count of participants
        # with more rows than that (never negative).
        assert smd["fedq.max_rows_per_unit"] == "1"
        assert int(smd["fedq.truncated_participants"]) >= 0
        assert float(smd["fedq.truncated_participants_ci95"]) > 0

        # 3000 participants, noise scale ≈ 10.2: the total is within 10.2 * ln(1e12) ≈ 281 of
        # the truth with probability > 1 - 1e-12 per count (false failure < 1e-9).
        total = sum(x for x in table.column("n").to_pylist() if x is not None)
        assert abs(total - 3000) < 2 * 400
        for y in table.column("mean_birth_year").to_pylist():
            assert y is None or 1900 <= y <= 2030

        df = table.to_pandas()
        # The policy suppresses small cells (min_reported_count = 11): the extra column
        # says which values of a row are NULL because of it (None when nothing is).
        assert list(df.columns) == ["sex", "n", "mean_birth_year", "fedq_suppressed"]
        assert all(x is None for x in table.column("fedq_suppressed").to_pylist())


def test_explain_costs_nothing_and_shows_the_centred_sensitivity(federation):
    with connect(federation) as conn:
        cur = conn.cursor()
        cur.execute("SHOW BUDGET")
        before = cur.fetchall()[0][0]
        cur.execute("EXPLAIN SELECT AVG(birth_year) FROM participants")
        table = cur.fetch_arrow_table()
        rows = table.to_pylist()
        stats = {r["name"]: r for r in rows if r["item"] == "statistic"}
        # R = 1, S = 2, birth_year in [1900, 2030]: the centred sum has sensitivity 2 * 65.
        assert stats["SUM(birth_year - 1965) in units of 1"]["sensitivity"] == 130
        assert stats["COUNT(birth_year)"]["sensitivity"] == 2
        query_eps = next(r["epsilon"] for r in rows if r["item"] == "query")
        assert math.isclose(sum(r["epsilon"] for r in stats.values()), query_eps, rel_tol=1e-12)
        cur.execute("SHOW BUDGET")
        assert cur.fetchall()[0][0] == before


def test_refusal_reaches_the_client(federation):
    with connect(federation) as conn:
        cur = conn.cursor()
        with pytest.raises(Exception) as e:
            cur.execute("SELECT * FROM labs")
        assert "never rows" in str(e.value)


def test_wrong_password_is_refused(federation):
    with pytest.raises(Exception) as e:
        with connect(federation, password="not-the-password") as conn:
            conn.cursor().execute("SELECT COUNT(*) FROM participants")
    assert "wrong user name or password" in str(e.value).lower()
    assert "UNAUTHENTICATED" in str(e.value).upper()


def test_forged_bearer_token_is_refused(federation):
    with connect_with_header(federation, "Bearer " + "ab" * 32) as conn:
        cur = conn.cursor()
        with pytest.raises(Exception) as e:
            cur.execute("SELECT COUNT(*) FROM participants")
        assert "token" in str(e.value).lower()


def test_officer_actions_need_the_officer_role(federation):
    # The officer logs in with username/password too, but runs no query.
    with connect(federation, user=federation["officer"],
                 password=federation["officer_password"]) as conn:
        cur = conn.cursor()
        with pytest.raises(Exception) as e:
            cur.execute("SELECT COUNT(*) FROM participants")
        assert "officer" in str(e.value).lower()


def test_tls_endpoint_with_the_federation_ca(tls_federation):
    """grpc+tls:// with the federation CA as the trusted root: logs in and answers."""
    info = tls_federation
    assert info["grpc"].startswith("grpc+tls://")
    with open(info["ca"]) as f:
        ca = f.read()
    with flightsql.connect(
        info["grpc"],
        db_kwargs={
            "username": info["user"],
            "password": info["password"],
            adbc_driver_flightsql.DatabaseOptions.TLS_ROOT_CERTS.value: ca,
        },
    ) as conn:
        cur = conn.cursor()
        cur.execute("SELECT COUNT(*) AS n FROM participants")
        table = cur.fetch_arrow_table()
        assert table.num_rows == 1
        assert table.schema.metadata[b"fedq.epsilon_spent"] == b"1"


def test_tls_endpoint_refuses_plaintext_and_unknown_roots(tls_federation):
    info = tls_federation
    plain = info["grpc"].replace("grpc+tls://", "grpc://")
    for uri, extra in [(plain, {}), (info["grpc"], {})]:
        # Plaintext to a TLS endpoint, and TLS without the federation CA (system roots
        # do not know it): neither logs in.
        with pytest.raises(Exception):
            with flightsql.connect(
                uri,
                db_kwargs={"username": info["user"], "password": info["password"], **extra},
            ) as conn:
                cur = conn.cursor()
                cur.execute("SELECT COUNT(*) FROM participants")
                cur.fetch_arrow_table()
