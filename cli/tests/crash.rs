//! Crash safety: a child `fedq coordinator` process is killed with SIGKILL at random points
//! during a stream of queries, several times, over the same ledger file. After each kill:
//! `fedq audit verify` passes, every answer the client received has a charge in state
//! `released` and a `query.charged` audit entry, and the researcher's spent ε equals the sum
//! of the charges that were not refunded (so spent ≥ released).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fedq::client::FedqClient;
use fedq_coordinator::audit;
use fedq_coordinator::release::META_QUERY_ID;
use fedq_coordinator::{BudgetKind, Ledger};

/// Kills per run; `FEDQ_CRASH_ROUNDS` asks for a longer run (the README's figures).
fn rounds() -> usize {
    std::env::var("FEDQ_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(6)
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        // xorshift64*: test scheduling only, nothing private.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

fn point_config_at_nodes(dir: &Path, endpoints: &[(String, SocketAddr)]) {
    let p = dir.join("coordinator.toml");
    let mut v: toml::Value = toml::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let nodes: Vec<toml::Value> = endpoints
        .iter()
        .map(|(site, addr)| {
            let mut t = toml::map::Map::new();
            t.insert("site".into(), toml::Value::String(site.clone()));
            t.insert(
                "endpoint".into(),
                toml::Value::String(format!("https://{addr}")),
            );
            toml::Value::Table(t)
        })
        .collect();
    v["nodes"] = toml::Value::Array(nodes);
    v["listen"] = toml::Value::String("127.0.0.1:0".into());
    std::fs::write(&p, toml::to_string(&v).unwrap()).unwrap();
}

fn start_coordinator(config: &Path) -> (std::process::Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedq"))
        .args(["coordinator", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fedq coordinator");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("coordinator output");
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (child, addr)
}

fn check_ledger(ledger: &Path, received: &[String], round: usize) {
    // The CLI verifies the chain (and exits non-zero naming the first bad entry if not).
    let out = Command::new(env!("CARGO_BIN_EXE_fedq"))
        .args(["audit", "verify", "--ledger"])
        .arg(ledger)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "round {round}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let l = Ledger::open(ledger).unwrap();
    let charges = l.charges().unwrap();
    for qid in received {
        let c = charges
            .iter()
            .find(|c| &c.query_id == qid)
            .unwrap_or_else(|| panic!("round {round}: received {qid} has no charge"));
        assert_eq!(c.state, "released", "round {round}: {qid}");
    }
    let kept: f64 = charges
        .iter()
        .filter(|c| c.researcher == "alice" && c.state != "refunded")
        .map(|c| c.epsilon)
        .sum();
    let spent = l
        .status(BudgetKind::Researcher, "alice")
        .unwrap()
        .epsilon_spent;
    assert!(
        (spent - kept).abs() < 1e-6,
        "round {round}: spent {spent}, charges {kept}"
    );
    assert!(spent + 1e-9 >= received.len() as f64 * 0.01);
    let conn = audit::open_read_only(ledger).unwrap();
    let rows = audit::read_rows(&conn, ledger).unwrap();
    for qid in received {
        assert!(
            rows.iter().any(|r| r.entry.contains("\"query.charged\"")
                && r.entry.contains(&format!("\"query_id\":\"{qid}\""))),
            "round {round}: {qid} has no query.charged entry"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_never_loses_a_charge() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fedq_synth::generate(&fedq_synth::SynthConfig {
        sites: 2,
        participants: 400,
        seed: 31,
        out_dir: dir.to_path_buf(),
        base_port: 31050,
    })
    .unwrap();
    let mut nodes = Vec::new();
    let mut endpoints = Vec::new();
    for sd in fedq::federation::site_dirs(dir).unwrap() {
        let mut cfg = fedq_node::NodeConfig::load(&sd.join("node.toml")).unwrap();
        cfg.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let site = cfg.site.clone();
        let h = fedq_node::start(cfg).await.unwrap();
        endpoints.push((site, h.addr));
        nodes.push(h);
    }
    point_config_at_nodes(dir, &endpoints);
    let config = dir.join("coordinator.toml");
    let ledger = dir.join("ledger.sqlite");
    let password = std::fs::read_to_string(dir.join("researchers/alice.password"))
        .unwrap()
        .trim()
        .to_string();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    let mut rng = Rng(seed);
    let mut received: Vec<String> = Vec::new();
    let mut k = 0u64;
    let mut kills_mid_query = 0;
    let rounds = rounds();
    for round in 0..rounds {
        let (mut child, addr) = start_coordinator(&config);
        let deadline = Instant::now() + Duration::from_millis(150 + rng.below(1200));
        let mut client = FedqClient::connect(&format!("http://{addr}"), "alice", &password)
            .await
            .unwrap();
        client.query("SET fedq.epsilon = 0.01").await.unwrap();
        loop {
            k += 1;
            // Distinct plans, so that every query is charged (no free replays).
            let sql = format!(
                "SELECT COUNT(*) FROM participants WHERE birth_year >= {} AND birth_year < {}",
                1900 + k % 100,
                2100 + k
            );
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::select! {
                r = client.query(&sql) => {
                    let r = r.unwrap_or_else(|e| panic!("round {round}: {e}"));
                    received.push(r.schema.metadata()[META_QUERY_ID].clone());
                }
                _ = tokio::time::sleep(left) => {
                    kills_mid_query += 1;
                    break;
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        child.kill().expect("SIGKILL the coordinator");
        child.wait().unwrap();
        check_ledger(&ledger, &received, round);
    }
    assert!(
        received.len() >= rounds,
        "too few queries answered: {}",
        received.len()
    );
    eprintln!(
        "crash test: {rounds} SIGKILLs ({kills_mid_query} during a query), {} answers received, all charged",
        received.len()
    );
    for n in nodes {
        n.shutdown().await.unwrap();
    }
}
