//! The `fedq` binary: thin wrappers that turn arguments into validated configs and call the
//! libraries. See `fedq --help`.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use fedq::client::FedqClient;
use fedq::render::render;
use fedq::CliError;

/// fedq: privacy-preserving federated SQL over hospital data.
#[derive(Parser)]
#[command(name = "fedq", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a hospital node beside the local data files.
    Node(NodeArgs),
    /// Run the coordinator (the Flight SQL endpoint researchers connect to).
    Coordinator(CoordinatorArgs),
    /// Query a coordinator: one statement, or an interactive prompt.
    Sql(SqlArgs),
    /// Show each node's health, version and tables.
    Status(ConnArgs),
    /// Generate a synthetic federation (data files and configs).
    Synth(SynthArgs),
    /// Generate a small federation, start it on loopback and run example queries.
    Demo(DemoArgs),
    /// Benchmark federated against centralised execution on a synth directory.
    Bench(BenchArgs),
    /// Bias from bounding and error at ε = 1 of reference queries, against exact answers.
    Accuracy(AccuracyArgs),
    /// Privacy budgets: your own (`show`), or for officers `grant`, `revoke`, `list`.
    Budget {
        #[command(subcommand)]
        command: BudgetCommand,
    },
    /// The coordinator's privacy policy (officers).
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The tamper-evident audit log in the ledger file: verify or export it.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Researcher and officer accounts (privacy officers).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Development certificates for mTLS between the coordinator and the nodes.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a development CA (`ca.pem`, `ca.key`) in a directory.
    Init(CertsInitArgs),
    /// Issue a certificate signed by the CA for a site or a coordinator.
    Issue(CertsIssueArgs),
}

#[derive(Args)]
struct CertsInitArgs {
    /// Directory for `ca.pem` and `ca.key` (created; the key is written with mode 0600).
    #[arg(long)]
    dir: PathBuf,
    /// Common name of the CA.
    #[arg(long, default_value = "fedq development CA")]
    name: String,
    /// Replace an existing CA in the directory (certificates it issued stop working).
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct CertsIssueArgs {
    /// Directory holding the CA; `<name>.pem` and `<name>.key` are written there.
    #[arg(long)]
    dir: PathBuf,
    /// Name in the certificate: a node's site name (e.g. site01), or the coordinator name
    /// that nodes list in `allowed_coordinators`.
    #[arg(long)]
    name: String,
    /// Further host names or IP addresses the certificate is valid for (repeatable).
    #[arg(long = "san")]
    sans: Vec<String>,
}

fn run_certs(command: CertsCommand) -> Result<(), CliError> {
    use fedq_synth::certs::{DevCa, CA_CERT};
    match command {
        CertsCommand::Init(a) => {
            if a.dir.join(CA_CERT).exists() && !a.force {
                return Err(CliError::User(format!(
                    "{} already exists; pass --force to replace the CA (every certificate it issued stops working)",
                    a.dir.join(CA_CERT).display()
                )));
            }
            let ca = DevCa::generate(&a.name)?;
            let (cert, key) = ca.write(&a.dir)?;
            println!("CA certificate: {}", cert.display());
            println!(
                "CA key:         {} (keep it private; needed only to issue certificates)",
                key.display()
            );
        }
        CertsCommand::Issue(a) => {
            let ca = DevCa::load(&a.dir)?;
            let p = ca.issue_to(&a.dir, &a.name, &a.sans)?;
            println!("certificate: {}", p.cert.display());
            println!("key:         {}", p.key.display());
        }
    }
    Ok(())
}

#[derive(Subcommand)]
enum BudgetCommand {
    /// Your own budget: granted, spent, remaining.
    Show(ConnArgs),
    /// Add ε (and δ) to a researcher's or dataset's budget (privacy officers).
    Grant(GrantArgs),
    /// Take ε back from a budget, or revoke it entirely (privacy officers).
    Revoke(RevokeArgs),
    /// Every researcher and dataset budget (privacy officers).
    List(ConnArgs),
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Policy, datasets and the hash of catalog + policy (privacy officers).
    Show(ConnArgs),
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check every link of the hash chain; names the first bad entry and exits non-zero.
    Verify(VerifyArgs),
    /// Write the log for an external archive, ending with the chain head.
    Export(ExportArgs),
}

#[derive(Args)]
struct TargetArgs {
    /// The researcher whose budget to change.
    #[arg(long, conflicts_with = "dataset", required_unless_present = "dataset")]
    researcher: Option<String>,
    /// The dataset whose global budget to change.
    #[arg(long)]
    dataset: Option<String>,
}

impl TargetArgs {
    fn split(self) -> (fedq_coordinator::BudgetKind, String) {
        match (self.researcher, self.dataset) {
            (Some(r), _) => (fedq_coordinator::BudgetKind::Researcher, r),
            (None, Some(d)) => (fedq_coordinator::BudgetKind::Dataset, d),
            (None, None) => (fedq_coordinator::BudgetKind::Researcher, String::new()),
        }
    }
}

#[derive(Args)]
struct GrantArgs {
    #[command(flatten)]
    conn: ConnArgs,
    #[command(flatten)]
    target: TargetArgs,
    /// ε to add.
    #[arg(long, allow_hyphen_values = true)]
    epsilon: f64,
    /// δ to add.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    delta: f64,
    /// Make the budget renew every this many days.
    #[arg(long, allow_hyphen_values = true)]
    renewal_days: Option<f64>,
}

/// A validated grant.
struct GrantCmd {
    conn: fedq::admin::Connection,
    request: fedq_coordinator::service::GrantRequest,
}

impl TryFrom<GrantArgs> for GrantCmd {
    type Error = CliError;
    fn try_from(a: GrantArgs) -> Result<Self, CliError> {
        let conn = Conn::try_from(a.conn)?;
        let (kind, name) = a.target.split();
        fedq_coordinator::Grant {
            kind,
            name: name.clone(),
            epsilon: a.epsilon,
            delta: a.delta,
            renewal_days: a.renewal_days,
        }
        .validate()?;
        Ok(GrantCmd {
            conn: conn.into(),
            request: fedq_coordinator::service::GrantRequest {
                kind,
                name,
                epsilon: a.epsilon,
                delta: a.delta,
                renewal_days: a.renewal_days,
            },
        })
    }
}

#[derive(Args)]
struct RevokeArgs {
    #[command(flatten)]
    conn: ConnArgs,
    #[command(flatten)]
    target: TargetArgs,
    /// ε to take back; without it the whole budget is revoked (nothing more is answered).
    #[arg(long, allow_hyphen_values = true)]
    epsilon: Option<f64>,
}

/// A validated revocation.
struct RevokeCmd {
    conn: fedq::admin::Connection,
    request: fedq_coordinator::service::RevokeRequest,
}

impl TryFrom<RevokeArgs> for RevokeCmd {
    type Error = CliError;
    fn try_from(a: RevokeArgs) -> Result<Self, CliError> {
        let conn = Conn::try_from(a.conn)?;
        if let Some(e) = a.epsilon {
            fedq_coordinator::ledger::check_amount("ε", e, fedq_coordinator::ledger::MAX_EPSILON)?;
        }
        let (kind, name) = a.target.split();
        Ok(RevokeCmd {
            conn: conn.into(),
            request: fedq_coordinator::service::RevokeRequest {
                kind,
                name,
                epsilon: a.epsilon,
            },
        })
    }
}

#[derive(Args)]
struct VerifyArgs {
    /// The ledger file (`ledger` in coordinator.toml).
    #[arg(long)]
    ledger: PathBuf,
    /// A chain head exported earlier: the chain must still contain it.
    #[arg(long)]
    anchor: Option<String>,
}

impl TryFrom<VerifyArgs> for fedq::admin::VerifyConfig {
    type Error = CliError;
    fn try_from(a: VerifyArgs) -> Result<Self, CliError> {
        if let Some(h) = &a.anchor {
            if h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(CliError::User(
                    "--anchor must be a chain head: 64 hex characters".into(),
                ));
            }
        }
        Ok(fedq::admin::VerifyConfig {
            ledger: a.ledger,
            anchor: a.anchor.map(|h| h.to_ascii_lowercase()),
        })
    }
}

#[derive(Args)]
struct ExportArgs {
    /// The ledger file (`ledger` in coordinator.toml).
    #[arg(long)]
    ledger: PathBuf,
    /// Output format; `jsonl` (one entry per line, then the chain head).
    #[arg(long, default_value = "jsonl")]
    format: String,
    /// Write here instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

impl TryFrom<ExportArgs> for fedq::admin::ExportConfig {
    type Error = CliError;
    fn try_from(a: ExportArgs) -> Result<Self, CliError> {
        if a.format != "jsonl" {
            return Err(CliError::User(format!(
                "unknown --format {}; fedq exports `jsonl`",
                a.format
            )));
        }
        Ok(fedq::admin::ExportConfig {
            ledger: a.ledger,
            out: a.out,
        })
    }
}

impl From<Conn> for fedq::admin::Connection {
    fn from(c: Conn) -> Self {
        fedq::admin::Connection {
            url: c.url,
            user: c.user,
            password: c.password,
            ca: c.ca,
        }
    }
}

#[derive(Args)]
struct NodeArgs {
    /// Node config file (node.toml).
    #[arg(long)]
    config: PathBuf,
    /// Override the listen address from the config.
    #[arg(long)]
    listen: Option<SocketAddr>,
}

impl TryFrom<NodeArgs> for fedq_node::NodeConfig {
    type Error = CliError;
    fn try_from(a: NodeArgs) -> Result<Self, CliError> {
        let mut c = fedq_node::NodeConfig::load(&a.config)?;
        if let Some(l) = a.listen {
            c.listen = l;
        }
        Ok(c)
    }
}

#[derive(Args)]
struct CoordinatorArgs {
    /// Coordinator config file (coordinator.toml).
    #[arg(long)]
    config: PathBuf,
    /// Override the listen address from the config.
    #[arg(long)]
    listen: Option<SocketAddr>,
}

impl TryFrom<CoordinatorArgs> for fedq_coordinator::CoordinatorConfig {
    type Error = CliError;
    fn try_from(a: CoordinatorArgs) -> Result<Self, CliError> {
        let mut c = fedq_coordinator::CoordinatorConfig::load(&a.config)?;
        if let Some(l) = a.listen {
            c.listen = l;
        }
        Ok(c)
    }
}

#[derive(Args, Clone)]
struct ConnArgs {
    /// Coordinator URL.
    #[arg(long, env = "FEDQ_URL", default_value = "http://127.0.0.1:31050")]
    url: String,
    /// Your user name.
    #[arg(long, env = "FEDQ_USER")]
    user: Option<String>,
    /// File holding your password (e.g. researchers/alice.password from `fedq synth`).
    #[arg(long, env = "FEDQ_PASSWORD_FILE")]
    password_file: Option<PathBuf>,
    /// CA certificate (PEM) that issued the coordinator's certificate, for a TLS endpoint
    /// (`https://` or `grpc+tls://` URLs).
    #[arg(long, env = "FEDQ_CA")]
    ca: Option<PathBuf>,
}

/// Validated connection settings.
struct Conn {
    url: String,
    user: String,
    password: String,
    ca: Option<Vec<u8>>,
}

impl TryFrom<ConnArgs> for Conn {
    type Error = CliError;
    fn try_from(a: ConnArgs) -> Result<Self, CliError> {
        let password = match (&a.password_file, std::env::var("FEDQ_PASSWORD")) {
            (Some(p), _) => std::fs::read_to_string(p)
                .map_err(|e| {
                    CliError::User(format!("cannot read password file {}: {e}", p.display()))
                })?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
            (None, Ok(t)) => t,
            (None, Err(_)) => {
                return Err(CliError::User(
                    "no credentials: pass --user NAME and --password-file FILE (or set FEDQ_USER and FEDQ_PASSWORD_FILE or FEDQ_PASSWORD)"
                        .into(),
                ))
            }
        };
        if password.is_empty() {
            return Err(CliError::User("the password is empty".into()));
        }
        let user = match a.user {
            Some(u) => u,
            None => {
                // `researchers/alice.password` names its user.
                a.password_file
                    .as_ref()
                    .and_then(|p| p.file_stem())
                    .and_then(|s| s.to_str())
                    .map(str::to_string)
                    .ok_or_else(|| CliError::User("pass --user NAME (or set FEDQ_USER)".into()))?
            }
        };
        let ca = match &a.ca {
            Some(p) => Some(std::fs::read(p).map_err(|e| {
                CliError::User(format!("cannot read CA file {}: {e}", p.display()))
            })?),
            None => None,
        };
        Ok(Conn {
            url: a.url,
            user,
            password,
            ca,
        })
    }
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a researcher or privacy officer (privacy officers).
    Add(UserAddArgs),
    /// Disable a user: they cannot log in, and their tokens stop working (privacy officers).
    Disable(UserNameArgs),
    /// Lift a user's login lockout after too many failed logins (privacy officers).
    Unlock(UserNameArgs),
    /// Every user with role and state (privacy officers).
    List(ConnArgs),
    /// Print the Argon2 hash of a password read from standard input, for
    /// `password_argon2` in coordinator.toml.
    HashPassword,
}

#[derive(Args)]
struct UserAddArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The new user's name.
    #[arg(long)]
    name: String,
    /// `researcher` or `officer`.
    #[arg(long, default_value = "researcher")]
    role: String,
    /// Write a freshly generated password here (mode 0600) and give it to the user.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct UserNameArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The user's name.
    #[arg(long)]
    name: String,
}

async fn run_user(command: UserCommand) -> Result<(), CliError> {
    match command {
        UserCommand::Add(a) => {
            let role = match a.role.as_str() {
                "researcher" => fedq_coordinator::Role::Researcher,
                "officer" => fedq_coordinator::Role::Officer,
                other => {
                    return Err(CliError::User(format!(
                        "unknown --role {other}; use researcher or officer"
                    )))
                }
            };
            fedq_coordinator::ledger::check_user_name(&a.name)?;
            if a.out.exists() {
                return Err(CliError::User(format!(
                    "{} exists; choose a new file for the password",
                    a.out.display()
                )));
            }
            let conn: fedq::admin::Connection = Conn::try_from(a.conn)?.into();
            let mut raw = [0u8; 20];
            opendp::traits::samplers::fill_bytes(&mut raw)
                .map_err(|e| CliError::User(format!("no randomness for a password: {e}")))?;
            let password = hex::encode(raw);
            let req = fedq_coordinator::service::UserAddRequest {
                name: a.name.clone(),
                role,
                password: password.clone(),
            };
            fedq::admin::user_add(&conn, &req).await?;
            write_secret(&a.out, &format!("{password}\n"))?;
            println!(
                "added {} ({}); password written to {} (mode 0600): give it to them securely",
                a.name,
                role.as_str(),
                a.out.display()
            );
        }
        UserCommand::Disable(a) => {
            let conn: fedq::admin::Connection = Conn::try_from(a.conn)?.into();
            fedq::admin::user_disable(&conn, &a.name).await?;
            println!(
                "disabled {}: they cannot log in, and their tokens no longer work",
                a.name
            );
        }
        UserCommand::Unlock(a) => {
            let conn: fedq::admin::Connection = Conn::try_from(a.conn)?.into();
            let v = fedq::admin::user_unlock(&conn, &a.name).await?;
            if v["unlocked"].as_bool() == Some(true) {
                println!("unlocked {}: they can log in again", a.name);
            } else {
                println!("{} was not locked or held back; nothing to lift", a.name);
            }
        }
        UserCommand::List(a) => {
            println!(
                "{}",
                fedq::admin::user_list(&Conn::try_from(a)?.into()).await?
            );
        }
        UserCommand::HashPassword => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            let password = line.trim_end_matches(['\n', '\r']);
            if password.is_empty() {
                return Err(CliError::User("type the password on standard input".into()));
            }
            println!("{}", fedq_coordinator::auth::hash_password(password)?);
        }
    }
    Ok(())
}

fn write_secret(path: &std::path::Path, text: &str) -> Result<(), CliError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| CliError::User(format!("cannot create {}: {e}", path.display())))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

#[derive(Args)]
struct SqlArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// ε for the statement(s) (runs `SET fedq.epsilon` first).
    #[arg(long)]
    epsilon: Option<f64>,
    /// Show what the query would cost and how accurate it would be (sensitivities, ε
    /// split, noise scales, expected 95% errors), without running it: free, reads no data.
    #[arg(long, requires = "query")]
    explain: bool,
    /// SQL to run; without it, an interactive prompt starts.
    query: Option<String>,
}

#[derive(Args)]
struct SynthArgs {
    /// Number of hospital sites.
    #[arg(long, default_value_t = 5)]
    sites: usize,
    /// Number of participants across all sites.
    #[arg(long, default_value_t = 20_000)]
    participants: usize,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Seed: the same seed gives the same data files.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Coordinator port in the generated configs; site i listens on base-port + i.
    #[arg(long, default_value_t = 31050)]
    base_port: u16,
}

impl TryFrom<SynthArgs> for fedq_synth::SynthConfig {
    type Error = CliError;
    fn try_from(a: SynthArgs) -> Result<Self, CliError> {
        Ok(fedq_synth::SynthConfig {
            sites: a.sites,
            participants: a.participants,
            seed: a.seed,
            out_dir: a.out,
            base_port: a.base_port,
        })
    }
}

#[derive(Args)]
struct DemoArgs {
    /// Number of sites.
    #[arg(long, default_value_t = 5)]
    sites: usize,
    /// Number of participants.
    #[arg(long, default_value_t = 20_000)]
    participants: usize,
    /// Seed of the synthetic data.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Keep the federation running and print how to connect.
    #[arg(long)]
    serve: bool,
    /// Coordinator address when serving.
    #[arg(long, default_value = "127.0.0.1:31050")]
    listen: SocketAddr,
    /// Write the federation here instead of a temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// With --serve: write connection details as JSON to this file once ready.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Serve the researcher endpoint over TLS (grpc+tls://) with the synthetic
    /// coordinator certificate; clients pass certs/ca.pem of the federation directory.
    #[arg(long)]
    researcher_tls: bool,
}

impl TryFrom<DemoArgs> for fedq::demo::DemoConfig {
    type Error = CliError;
    fn try_from(a: DemoArgs) -> Result<Self, CliError> {
        if a.sites == 0 || a.participants < a.sites {
            return Err(CliError::User(
                "need at least 1 site and at least as many participants as sites".into(),
            ));
        }
        Ok(fedq::demo::DemoConfig {
            sites: a.sites,
            participants: a.participants,
            seed: a.seed,
            serve: a.serve,
            listen: a.listen,
            dir: a.dir,
            ready_file: a.ready_file,
            researcher_tls: a.researcher_tls,
        })
    }
}

#[derive(Args)]
struct BenchArgs {
    /// Directory written by `fedq synth`.
    #[arg(long)]
    data: PathBuf,
    /// Timed runs per query and side.
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Benchmark these queries instead of the reference set; `NAME=SQL`, repeatable.
    #[arg(long = "query", value_name = "NAME=SQL")]
    queries: Vec<String>,
    /// Also print where each federated query's time goes: the coordinator's phases (plan,
    /// replay, probe, charge, gather, release, store) and each node's (validate, queue,
    /// plan, physical, execute).
    #[arg(long)]
    breakdown: bool,
    /// Measure throughput instead: this many concurrent clients, each its own researcher,
    /// run distinct queries for `--seconds`; prints queries/s and latency percentiles.
    #[arg(long)]
    clients: Option<usize>,
    /// Length of the throughput run (with `--clients`).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
}

#[derive(clap::Args)]
struct AccuracyArgs {
    /// Directory written by `fedq synth`.
    #[arg(long)]
    data: PathBuf,
    /// Noisy runs per query (each one a real, charged query at ε ≈ 1).
    #[arg(long, default_value_t = 20)]
    runs: usize,
}

async fn run_sql(args: SqlArgs) -> Result<(), CliError> {
    let conn = Conn::try_from(args.conn)?;
    let mut client =
        FedqClient::connect_with_ca(&conn.url, conn.ca.as_deref(), &conn.user, &conn.password)
            .await?;
    if let Some(e) = args.epsilon {
        client.query(&format!("SET fedq.epsilon = {e}")).await?;
    }
    if let Some(q) = args.query {
        let q = if args.explain {
            format!("EXPLAIN {q}")
        } else {
            q
        };
        let r = client.query(&q).await?;
        print!("{}", render(&r.schema, &r.batches)?);
        return Ok(());
    }
    println!("fedq sql: connected to {}. End statements with Enter; \\q quits, \\budget shows your budget.", conn.url);
    let stdin = std::io::stdin();
    let mut buf = String::new();
    loop {
        print!("{}", if buf.is_empty() { "fedq> " } else { "   -> " });
        std::io::stdout().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let t = line.trim();
        if buf.is_empty()
            && (t == "\\q" || t.eq_ignore_ascii_case("exit") || t.eq_ignore_ascii_case("quit"))
        {
            break;
        }
        if buf.is_empty() && t == "\\budget" {
            match client
                .action(fedq_coordinator::service::ACTION_BUDGET)
                .await
            {
                Ok(v) => println!("{v}"),
                Err(e) => println!("error: {e}"),
            }
            continue;
        }
        if t.is_empty() {
            continue;
        }
        buf.push_str(t);
        buf.push(' ');
        if !t.ends_with(';')
            && !t.to_ascii_lowercase().starts_with("set ")
            && !line_is_complete(&buf)
        {
            continue;
        }
        let sql = std::mem::take(&mut buf);
        match client.query(sql.trim().trim_end_matches(';')).await {
            Ok(r) => print!("{}", render(&r.schema, &r.batches)?),
            Err(e) => println!("error: {e}"),
        }
    }
    Ok(())
}

/// A statement without `;` runs when the line ends (single-line statements).
fn line_is_complete(_buf: &str) -> bool {
    true
}

async fn run_status(args: ConnArgs) -> Result<(), CliError> {
    let conn = Conn::try_from(args)?;
    let mut client =
        FedqClient::connect_with_ca(&conn.url, conn.ca.as_deref(), &conn.user, &conn.password)
            .await?;
    let v = client
        .action(fedq_coordinator::service::ACTION_STATUS)
        .await?;
    for n in v.as_array().cloned().unwrap_or_default() {
        let site = n["site"].as_str().unwrap_or("?");
        if n["healthy"].as_bool() == Some(true) {
            let i = &n["info"];
            let state = if n["compatible"].as_bool() == Some(false) {
                "INCOMPATIBLE"
            } else {
                "up"
            };
            println!(
                "{site:<10} {state:<5} fedq {} protocol v{} (coordinator v{})  tables: {}",
                i["fedq_version"].as_str().unwrap_or("?"),
                i["protocol_version"],
                fedq_common::PROTOCOL_VERSION,
                i["tables"]
                    .as_array()
                    .map(|t| t
                        .iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default()
            );
        } else {
            println!("{site:<10} DOWN  {}", n["error"].as_str().unwrap_or(""));
        }
    }
    Ok(())
}

async fn wait_for_ctrl_c() -> Result<(), CliError> {
    tokio::signal::ctrl_c().await?;
    Ok(())
}

async fn main_inner(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Node(a) => {
            let cfg = fedq_node::NodeConfig::try_from(a)?;
            let h = fedq_node::start(cfg).await?;
            println!("fedq node listening on {}", h.addr);
            wait_for_ctrl_c().await?;
            h.shutdown().await?;
        }
        Command::Coordinator(a) => {
            let cfg = fedq_coordinator::CoordinatorConfig::try_from(a)?;
            let h = fedq_coordinator::start(cfg).await?;
            println!("fedq coordinator (Flight SQL) listening on {}", h.addr);
            wait_for_ctrl_c().await?;
            h.shutdown().await?;
        }
        Command::Sql(a) => run_sql(a).await?,
        Command::Status(a) => run_status(a).await?,
        Command::Synth(a) => {
            let cfg = fedq_synth::SynthConfig::try_from(a)?;
            let t = std::time::Instant::now();
            let s = fedq_synth::generate(&cfg)?;
            println!(
                "wrote {} sites to {} in {:.1} s",
                s.sites.len(),
                cfg.out_dir.display(),
                t.elapsed().as_secs_f64()
            );
            println!("  catalog:     {}", s.catalog_path.display());
            println!("  coordinator: {}", s.coordinator_config_path.display());
            for (name, p) in &s.researcher_password_paths {
                println!("  password of researcher {name}: {}", p.display());
            }
            for (name, p) in &s.officer_password_paths {
                println!("  password of officer {name}: {}", p.display());
            }
            println!(
                "  certificates (mTLS): {}",
                cfg.out_dir.join("certs").display()
            );
        }
        Command::Demo(a) => fedq::demo::run(fedq::demo::DemoConfig::try_from(a)?).await?,
        Command::Budget { command } => {
            let out = match command {
                BudgetCommand::Show(a) => {
                    fedq::admin::budget_show(&Conn::try_from(a)?.into()).await?
                }
                BudgetCommand::Grant(a) => {
                    let c = GrantCmd::try_from(a)?;
                    fedq::admin::budget_grant(&c.conn, &c.request).await?
                }
                BudgetCommand::Revoke(a) => {
                    let c = RevokeCmd::try_from(a)?;
                    fedq::admin::budget_revoke(&c.conn, &c.request).await?
                }
                BudgetCommand::List(a) => {
                    fedq::admin::budget_list(&Conn::try_from(a)?.into()).await?
                }
            };
            println!("{out}");
        }
        Command::Policy {
            command: PolicyCommand::Show(a),
        } => println!(
            "{}",
            fedq::admin::policy_show(&Conn::try_from(a)?.into()).await?
        ),
        Command::Audit { command } => match command {
            AuditCommand::Verify(a) => {
                let cfg = fedq::admin::VerifyConfig::try_from(a)?;
                let r = fedq::admin::audit_verify(&cfg)?;
                println!(
                    "audit log of {} verifies: {} entries, chain head {}",
                    cfg.ledger.display(),
                    r.entries,
                    r.head
                );
            }
            AuditCommand::Export(a) => {
                let cfg = fedq::admin::ExportConfig::try_from(a)?;
                let r = fedq::admin::audit_export(&cfg)?;
                if !r.ok() {
                    return Err(CliError::User(format!(
                        "exported, but the ledger does NOT verify: {}",
                        r.problem().unwrap_or_default()
                    )));
                }
                if cfg.out.is_some() {
                    eprintln!("exported {} entries, chain head {}", r.entries, r.head);
                }
            }
        },
        Command::Accuracy(a) => {
            fedq::accuracy::run(fedq::accuracy::AccuracyConfig {
                dir: a.data,
                runs: a.runs,
            })
            .await?
        }
        Command::Certs { command } => run_certs(command)?,
        Command::User { command } => run_user(command).await?,
        Command::Bench(a) => {
            let mut queries = Vec::new();
            for q in a.queries {
                let Some((name, sql)) = q.split_once('=') else {
                    return Err(CliError::User(format!(
                        "--query {q:?} is not NAME=SQL; write e.g. --query 'e11=SELECT COUNT(*) FROM diagnoses'"
                    )));
                };
                queries.push((name.trim().to_string(), sql.trim().to_string()));
            }
            fedq::bench::run(fedq::bench::BenchConfig {
                dir: a.data,
                runs: a.runs,
                queries,
                breakdown: a.breakdown,
                clients: a.clients,
                seconds: a.seconds,
            })
            .await?
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Worker threads with 16 MiB stacks: the SQL limits (`fedq_coordinator::sql_limits`) keep
    // every expression tree within what a 2 MiB stack plans in a debug build; this leaves
    // the release binary a wide margin for whatever recursion they do not foresee.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(16 << 20)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fedq: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(main_inner(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fedq: {e}");
            ExitCode::FAILURE
        }
    }
}
