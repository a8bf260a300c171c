//! Budget, policy and audit commands: `fedq budget show|grant|revoke|list`,
//! `fedq policy show`, `fedq audit verify|export`.
//!
//! Budget and policy commands go through the coordinator's Flight actions (officer commands
//! need a privacy officer's login; the coordinator checks the role), as do the user
//! commands `fedq user add|disable|list`. Audit commands read the
//! ledger file directly and read-only, so they work while the coordinator runs or is down.

use std::io::Write;
use std::path::PathBuf;

use fedq_coordinator::audit::{self, VerifyReport};
use fedq_coordinator::service::{
    GrantRequest, RevokeRequest, ACTION_BUDGET, ACTION_BUDGET_GRANT, ACTION_BUDGET_LIST,
    ACTION_BUDGET_REVOKE, ACTION_POLICY_SHOW, ACTION_USER_ADD, ACTION_USER_DISABLE,
    ACTION_USER_LIST, ACTION_USER_UNLOCK,
};
use fedq_coordinator::BudgetStatus;

use crate::client::FedqClient;
use crate::CliError;

/// Where to reach the coordinator, and as whom.
#[derive(Debug, Clone)]
pub struct Connection {
    /// Coordinator URL.
    pub url: String,
    /// User name.
    pub user: String,
    /// Password (logs in through the Flight handshake).
    pub password: String,
    /// CA (PEM) for a coordinator endpoint with TLS.
    pub ca: Option<Vec<u8>>,
}

impl Connection {
    /// Log in and return a client.
    pub async fn client(&self) -> Result<FedqClient, CliError> {
        FedqClient::connect_with_ca(&self.url, self.ca.as_deref(), &self.user, &self.password).await
    }
}

/// One budget as a text line.
pub fn budget_line(s: &BudgetStatus) -> String {
    let kind = match s.kind {
        fedq_coordinator::BudgetKind::Researcher => "researcher",
        fedq_coordinator::BudgetKind::Dataset => "dataset",
    };
    let mut line = format!(
        "{kind:<10} {:<16} ε budget {:>10}  spent {:>10}  remaining {:>10}",
        s.name,
        fmt(s.epsilon_budget),
        fmt(s.epsilon_spent),
        fmt(s.epsilon_remaining)
    );
    if s.delta_budget > 0.0 || s.delta_spent > 0.0 {
        line.push_str(&format!(
            "  δ budget {:e} spent {:e}",
            s.delta_budget, s.delta_spent
        ));
    }
    if let (Some(d), Some(end)) = (s.renewal_days, &s.period_ends) {
        line.push_str(&format!("  renews every {d} days (next {end})"));
    }
    if s.revoked {
        line.push_str("  REVOKED");
    }
    line
}

fn fmt(v: f64) -> String {
    let s = format!("{v:.9}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() {
        "0".into()
    } else {
        s.to_string()
    }
}

fn status(v: serde_json::Value) -> Result<BudgetStatus, CliError> {
    serde_json::from_value(v).map_err(|e| CliError::User(format!("bad budget from server: {e}")))
}

/// `fedq budget show`: the caller's own budget.
pub async fn budget_show(c: &Connection) -> Result<String, CliError> {
    let mut client = c.client().await?;
    let s = status(client.action(ACTION_BUDGET).await?)?;
    Ok(budget_line(&s))
}

/// `fedq budget grant` (officers).
pub async fn budget_grant(c: &Connection, g: &GrantRequest) -> Result<String, CliError> {
    let mut client = c.client().await?;
    let body = serde_json::to_value(g).map_err(|e| CliError::User(e.to_string()))?;
    let s = status(
        client
            .action_with_body(ACTION_BUDGET_GRANT, Some(&body))
            .await?,
    )?;
    Ok(format!("granted. {}", budget_line(&s)))
}

/// `fedq budget revoke` (officers).
pub async fn budget_revoke(c: &Connection, r: &RevokeRequest) -> Result<String, CliError> {
    let mut client = c.client().await?;
    let body = serde_json::to_value(r).map_err(|e| CliError::User(e.to_string()))?;
    let s = status(
        client
            .action_with_body(ACTION_BUDGET_REVOKE, Some(&body))
            .await?,
    )?;
    Ok(format!("revoked. {}", budget_line(&s)))
}

/// `fedq budget list` (officers).
pub async fn budget_list(c: &Connection) -> Result<String, CliError> {
    let mut client = c.client().await?;
    let v = client.action(ACTION_BUDGET_LIST).await?;
    let list: Vec<BudgetStatus> = serde_json::from_value(v)
        .map_err(|e| CliError::User(format!("bad budget list from server: {e}")))?;
    Ok(list.iter().map(budget_line).collect::<Vec<_>>().join("\n"))
}

/// `fedq policy show` (officers): pretty JSON.
pub async fn policy_show(c: &Connection) -> Result<String, CliError> {
    let mut client = c.client().await?;
    let v = client.action(ACTION_POLICY_SHOW).await?;
    serde_json::to_string_pretty(&v).map_err(|e| CliError::User(e.to_string()))
}

/// Validated `fedq audit verify`.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    /// The ledger file.
    pub ledger: PathBuf,
    /// A chain head exported earlier that the chain must contain.
    pub anchor: Option<String>,
}

/// `fedq audit verify`: the report, or an error naming the first bad entry or the first
/// table row that disagrees with the chain.
pub fn audit_verify(cfg: &VerifyConfig) -> Result<VerifyReport, CliError> {
    let r = audit::verify(&cfg.ledger, cfg.anchor.as_deref())?;
    match r.problem() {
        None => Ok(r),
        Some(p) => Err(CliError::User(format!(
            "audit log of {} does NOT verify: {p}",
            cfg.ledger.display()
        ))),
    }
}

/// Validated `fedq audit export`.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// The ledger file.
    pub ledger: PathBuf,
    /// Output file; standard output if `None`.
    pub out: Option<PathBuf>,
}

/// `fedq audit export --format jsonl`. Returns the report (the export is written even when
/// the chain does not verify; its last line says so).
pub fn audit_export(cfg: &ExportConfig) -> Result<VerifyReport, CliError> {
    match &cfg.out {
        Some(p) => {
            let f = std::fs::File::create(p)
                .map_err(|e| CliError::User(format!("cannot create {}: {e}", p.display())))?;
            let mut w = std::io::BufWriter::new(f);
            let r = audit::export_jsonl(&cfg.ledger, &mut w)?;
            w.flush()?;
            Ok(r)
        }
        None => {
            let stdout = std::io::stdout();
            let mut lock = stdout.lock();
            let r = audit::export_jsonl(&cfg.ledger, &mut lock)?;
            lock.flush()?;
            Ok(r)
        }
    }
}

/// `fedq user add` (officers). Returns the coordinator's answer.
pub async fn user_add(
    c: &Connection,
    req: &fedq_coordinator::service::UserAddRequest,
) -> Result<serde_json::Value, CliError> {
    let body = serde_json::to_value(req)
        .map_err(|e| CliError::User(format!("cannot encode the request: {e}")))?;
    c.client()
        .await?
        .action_with_body(ACTION_USER_ADD, Some(&body))
        .await
}

/// `fedq user disable` (officers).
pub async fn user_disable(c: &Connection, name: &str) -> Result<serde_json::Value, CliError> {
    user_action(c, ACTION_USER_DISABLE, name).await
}

/// `fedq user unlock` (officers): lift a login lockout. Answers `{"name", "unlocked"}`.
pub async fn user_unlock(c: &Connection, name: &str) -> Result<serde_json::Value, CliError> {
    user_action(c, ACTION_USER_UNLOCK, name).await
}

/// An officer action whose body names one user.
async fn user_action(
    c: &Connection,
    action: &str,
    name: &str,
) -> Result<serde_json::Value, CliError> {
    let body = serde_json::json!({ "name": name });
    c.client()
        .await?
        .action_with_body(action, Some(&body))
        .await
}

/// `fedq user list` (officers): one line per user.
pub async fn user_list(c: &Connection) -> Result<String, CliError> {
    let v = c.client().await?.action(ACTION_USER_LIST).await?;
    let mut out = String::new();
    for u in v.as_array().cloned().unwrap_or_default() {
        out.push_str(&format!(
            "{:<16} {:<10} {}\n",
            u["name"].as_str().unwrap_or("?"),
            u["role"].as_str().unwrap_or("?"),
            if u["disabled"].as_bool() == Some(true) {
                "DISABLED"
            } else {
                "active"
            }
        ));
    }
    Ok(out.trim_end().to_string())
}
