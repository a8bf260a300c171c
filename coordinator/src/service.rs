//! The researcher-facing Arrow Flight SQL service.
//!
//! Flow of a query: `GetFlightInfo(CommandStatementQuery)` parses, plans and checks the SQL
//! (refusals are reported before anything runs), then runs it: fan-out, charge, noise and
//! post-processing. The released result waits under a random ticket, and the FlightInfo
//! carries the result schema with all of fedq's metadata (noise scales, confidence
//! half-widths, ε spent, sites answered), so clients that only read the FlightInfo schema
//! (some ADBC drivers) still see it. `DoGet(ticket)` streams the result once, and only to
//! the researcher who asked. Results are aggregates over public domains, so they are small.
//!
//! Authentication: the handshake turns Basic credentials (checked against the Argon2 hashes
//! in the ledger) into a short-lived bearer token; [`crate::auth::AuthInterceptor`] checks
//! the token of every other call and attaches the [`Researcher`] or [`Officer`].

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTables, CommandPreparedStatementQuery, CommandStatementQuery,
    CommandStatementUpdate, ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{
    Action, ActionType, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest,
    HandshakeResponse, Ticket,
};
use datafusion::arrow::array::{RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use futures::{stream, Stream, TryStreamExt};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::audit::event::{AuditEvent, LoginFailed, LoginUnlocked, OfficerDenied};
use crate::auth::{BasicCredentials, Officer, Researcher, Role, Sessions};
use crate::engine::{parse_session_statement, random_id, Coordinator};
use crate::error::CoordinatorError;
use crate::ledger::{BudgetKind, Grant};
use crate::throttle::LoginThrottle;
use fedq_common::log_safe;

/// Flight action returning the caller's own budget as JSON ([`crate::BudgetStatus`]).
pub const ACTION_BUDGET: &str = "fedq.budget";
/// Flight action returning the health of every node as JSON.
pub const ACTION_STATUS: &str = "fedq.status";
/// Officer action: add ε/δ to a budget. Body: [`GrantRequest`] as JSON.
pub const ACTION_BUDGET_GRANT: &str = "fedq.budget.grant";
/// Officer action: take ε back from a budget, or revoke it. Body: [`RevokeRequest`].
pub const ACTION_BUDGET_REVOKE: &str = "fedq.budget.revoke";
/// Officer action: every budget (researchers and datasets) as JSON.
pub const ACTION_BUDGET_LIST: &str = "fedq.budget.list";
/// Officer action: the policy, datasets and the hash of catalog + policy as JSON.
pub const ACTION_POLICY_SHOW: &str = "fedq.policy.show";
/// Officer action: add a user. Body: [`UserAddRequest`].
pub const ACTION_USER_ADD: &str = "fedq.user.add";
/// Officer action: disable a user (their tokens stop working at once). Body: `{"name": ...}`.
pub const ACTION_USER_DISABLE: &str = "fedq.user.disable";
/// Officer action: every user with role and state (never password hashes).
pub const ACTION_USER_LIST: &str = "fedq.user.list";
/// Officer action: lift a user's login lockout and back-off. Body: `{"name": ...}`.
pub const ACTION_USER_UNLOCK: &str = "fedq.user.unlock";

/// The officer-only actions.
pub const OFFICER_ACTIONS: [&str; 8] = [
    ACTION_BUDGET_GRANT,
    ACTION_BUDGET_REVOKE,
    ACTION_BUDGET_LIST,
    ACTION_POLICY_SHOW,
    ACTION_USER_ADD,
    ACTION_USER_DISABLE,
    ACTION_USER_LIST,
    ACTION_USER_UNLOCK,
];

/// Body of [`ACTION_USER_ADD`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserAddRequest {
    /// User name.
    pub name: String,
    /// `researcher` or `officer`.
    pub role: Role,
    /// The initial password (sent once; only its Argon2 hash is stored).
    pub password: String,
}

/// Body of [`ACTION_USER_DISABLE`] and [`ACTION_USER_UNLOCK`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDisableRequest {
    /// User name.
    pub name: String,
}

/// Shortest password `fedq.user.add` accepts.
pub const MIN_PASSWORD_CHARS: usize = 12;

/// Body of [`ACTION_BUDGET_GRANT`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    /// `researcher` (default) or `dataset`.
    #[serde(default = "researcher_kind")]
    pub kind: BudgetKind,
    /// Researcher or dataset name.
    pub name: String,
    /// ε to add.
    pub epsilon: f64,
    /// δ to add.
    #[serde(default)]
    pub delta: f64,
    /// New renewal period in days.
    #[serde(default)]
    pub renewal_days: Option<f64>,
}

/// Body of [`ACTION_BUDGET_REVOKE`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// `researcher` (default) or `dataset`.
    #[serde(default = "researcher_kind")]
    pub kind: BudgetKind,
    /// Researcher or dataset name.
    pub name: String,
    /// ε to take back; `None` revokes the whole budget.
    #[serde(default)]
    pub epsilon: Option<f64>,
}

fn researcher_kind() -> BudgetKind {
    BudgetKind::Researcher
}

/// How long a planned statement waits for its `DoGet`.
const PENDING_TTL: Duration = Duration::from_secs(600);

/// Counts each researcher's running queries against a limit.
pub struct RunningQueries {
    limit: usize,
    running: Mutex<HashMap<String, usize>>,
}

/// One running query; leaving it (drop) frees the slot.
pub struct QuerySlot {
    owner: Arc<RunningQueries>,
    researcher: String,
}

impl RunningQueries {
    /// At most `limit` queries per researcher at once.
    pub fn new(limit: usize) -> RunningQueries {
        RunningQueries {
            limit,
            running: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take a slot for `researcher`, or refuse if they are at the limit.
    pub fn enter(self: &Arc<Self>, researcher: &str) -> Result<QuerySlot, CoordinatorError> {
        let mut map = self.lock();
        let n = map.entry(researcher.to_string()).or_insert(0);
        if *n >= self.limit {
            return Err(CoordinatorError::TooManyQueries(self.limit));
        }
        *n += 1;
        Ok(QuerySlot {
            owner: Arc::clone(self),
            researcher: researcher.to_string(),
        })
    }
}

impl Drop for QuerySlot {
    fn drop(&mut self) {
        let mut map = self.owner.lock();
        if let Some(n) = map.get_mut(&self.researcher) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.researcher);
            }
        }
    }
}

/// A released result waiting for its `DoGet`.
struct Pending {
    researcher: String,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    at: Instant,
}

/// The Flight SQL service.
#[derive(Clone)]
pub struct FedqFlightSqlService {
    engine: Arc<Coordinator>,
    sessions: Arc<Sessions>,
    throttle: Arc<LoginThrottle>,
    running: Arc<RunningQueries>,
    pending: Arc<Mutex<HashMap<Vec<u8>, Pending>>>,
    sql_info: Arc<SqlInfoData>,
}

fn researcher<T>(req: &Request<T>) -> Result<String, Status> {
    if let Some(r) = req.extensions().get::<Researcher>() {
        return Ok(r.0.clone());
    }
    if req.extensions().get::<Officer>().is_some() {
        return Err(CoordinatorError::Forbidden(
            "this is a privacy officer's token: officers manage budgets and policy but do not run queries; use a researcher token".into(),
        )
        .into());
    }
    Err(Status::unauthenticated("not authenticated"))
}

fn parse_body<T: serde::de::DeserializeOwned>(action: &Action) -> Result<T, CoordinatorError> {
    serde_json::from_slice(&action.body).map_err(|e| {
        CoordinatorError::InvalidArgument(format!(
            "the body of {} must be JSON like {}: {e}",
            action.r#type,
            if action.r#type == ACTION_BUDGET_GRANT {
                r#"{"kind":"researcher","name":"alice","epsilon":5}"#
            } else {
                r#"{"kind":"researcher","name":"alice","epsilon":2}"#
            }
        ))
    })
}

/// The body of an action that names one user (`fedq.user.disable`, `fedq.user.unlock`).
fn parse_name_body(action: &Action) -> Result<UserDisableRequest, CoordinatorError> {
    serde_json::from_slice(&action.body).map_err(|e| {
        CoordinatorError::InvalidArgument(format!(
            r#"the body of {} must be JSON like {{"name":"carol"}}: {e}"#,
            action.r#type
        ))
    })
}

fn message_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new(
        "result",
        DataType::Utf8,
        false,
    )]))
}

/// FlightInfo for a Flight SQL metadata command whose ticket is the command itself.
fn metadata_info<C: ProstMessageExt>(
    cmd: &C,
    schema: &Schema,
    descriptor: FlightDescriptor,
) -> Result<Response<FlightInfo>, Status> {
    let endpoint = FlightEndpoint::new().with_ticket(Ticket::new(cmd.as_any().encode_to_vec()));
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|_| Status::internal("could not encode schema"))?
        .with_endpoint(endpoint)
        .with_descriptor(descriptor);
    Ok(Response::new(info))
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn encode_stream(
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
) -> BoxStream<arrow_flight::FlightData> {
    let input = stream::iter(batches.into_iter().map(Ok::<_, FlightError>));
    let s = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(input)
        .map_err(|e| match e {
            FlightError::Tonic(s) => *s,
            other => {
                tracing::error!(error = %other, "encoding a result failed");
                Status::internal("could not encode the result")
            }
        });
    Box::pin(s)
}

impl FedqFlightSqlService {
    /// Service over an engine; logins issue tokens into `sessions`, and failed logins are
    /// held back as `login` says.
    pub fn new(
        engine: Arc<Coordinator>,
        sessions: Arc<Sessions>,
        login: crate::throttle::LoginPolicy,
    ) -> Result<Self, CoordinatorError> {
        let mut b = SqlInfoDataBuilder::new();
        b.append(SqlInfo::FlightSqlServerName, "fedq");
        b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        b.append(SqlInfo::FlightSqlServerArrowVersion, "59");
        b.append(SqlInfo::FlightSqlServerReadOnly, true);
        let sql_info = b
            .build()
            .map_err(|e| CoordinatorError::Config(format!("sql info: {e}")))?;
        Ok(FedqFlightSqlService {
            running: Arc::new(RunningQueries::new(engine.max_concurrent_per_researcher())),
            engine,
            sessions,
            throttle: Arc::new(LoginThrottle::new(login)),
            pending: Arc::new(Mutex::new(HashMap::new())),
            sql_info: Arc::new(sql_info),
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stash(&self, p: Pending) -> Vec<u8> {
        let handle = random_id().into_bytes();
        let mut map = self.pending();
        map.retain(|_, v| v.at.elapsed() < PENDING_TTL);
        map.insert(handle.clone(), p);
        handle
    }

    fn info_for(
        &self,
        handle: Vec<u8>,
        schema: &Schema,
        descriptor: FlightDescriptor,
    ) -> Result<FlightInfo, Status> {
        let ticket = TicketStatementQuery {
            statement_handle: handle.into(),
        };
        let endpoint =
            FlightEndpoint::new().with_ticket(Ticket::new(ticket.as_any().encode_to_vec()));
        FlightInfo::new()
            .try_with_schema(schema)
            .map_err(|e| {
                tracing::error!(error = %e, "schema encoding failed");
                Status::internal("could not encode the result schema")
            })
            .map(|i| i.with_endpoint(endpoint).with_descriptor(descriptor))
    }

    /// An officer action; every change is audited by the ledger with the officer as actor.
    fn officer_action(
        &self,
        officer: &str,
        action: &Action,
    ) -> Result<serde_json::Value, CoordinatorError> {
        let ledger = self.engine.ledger();
        let enc = |v: Result<_, serde_json::Error>| {
            v.map_err(|e| CoordinatorError::internal("-", format!("encoding an answer: {e}")))
        };
        match action.r#type.as_str() {
            ACTION_BUDGET_GRANT => {
                let g: GrantRequest = parse_body(action)?;
                self.check_grantee(&g)?;
                let st = ledger.grant(
                    officer,
                    &Grant {
                        kind: g.kind,
                        name: g.name,
                        epsilon: g.epsilon,
                        delta: g.delta,
                        renewal_days: g.renewal_days,
                    },
                )?;
                enc(serde_json::to_value(st))
            }
            ACTION_BUDGET_REVOKE => {
                let r: RevokeRequest = parse_body(action)?;
                let st = ledger.revoke(officer, r.kind, &r.name, r.epsilon)?;
                enc(serde_json::to_value(st))
            }
            ACTION_BUDGET_LIST => enc(serde_json::to_value(ledger.list()?)),
            ACTION_USER_ADD => {
                let u: UserAddRequest = serde_json::from_slice(&action.body).map_err(|e| {
                    CoordinatorError::InvalidArgument(format!(
                        r#"the body of {ACTION_USER_ADD} must be JSON like {{"name":"carol","role":"researcher","password":"..."}}: {e}"#
                    ))
                })?;
                crate::ledger::check_user_name(&u.name)?;
                if u.password.chars().count() < MIN_PASSWORD_CHARS {
                    return Err(CoordinatorError::InvalidArgument(format!(
                        "the password must have at least {MIN_PASSWORD_CHARS} characters; `fedq user add` generates one if you give none"
                    )));
                }
                let hash = crate::auth::hash_password(&u.password)?;
                ledger.add_user(officer, &u.name, u.role, &hash)?;
                tracing::info!(officer, user = %u.name, role = u.role.as_str(), "user added");
                Ok(serde_json::json!({"name": u.name, "role": u.role, "disabled": false}))
            }
            ACTION_USER_DISABLE => {
                let u = parse_name_body(action)?;
                if u.name == officer {
                    return Err(CoordinatorError::InvalidArgument(
                        "you cannot disable your own account; ask another privacy officer".into(),
                    ));
                }
                ledger.set_user_disabled(officer, &u.name, true)?;
                self.sessions.revoke_user(&u.name);
                tracing::info!(officer, user = %u.name, "user disabled");
                Ok(serde_json::json!({"name": u.name, "disabled": true}))
            }
            ACTION_USER_LIST => enc(serde_json::to_value(ledger.users()?)),
            ACTION_USER_UNLOCK => {
                let u = parse_name_body(action)?;
                crate::ledger::check_user_name(&u.name)?;
                let lifted = self.throttle.unlock(&u.name);
                ledger.record(
                    officer,
                    AuditEvent::LoginUnlocked(LoginUnlocked {
                        name: u.name.clone(),
                        lifted,
                    }),
                )?;
                tracing::info!(officer, user = %u.name, lifted, "login lockout lifted");
                Ok(serde_json::json!({"name": u.name, "unlocked": lifted}))
            }
            _ => Ok(serde_json::json!({
                "policy": self.engine.policy(),
                "datasets": self.engine.datasets(),
                "tables": self.engine.catalog().tables.keys().collect::<Vec<_>>(),
                "policy_hash": ledger.policy_hash()?,
                "ledger": ledger.path().display().to_string(),
            })),
        }
    }

    /// A grant must give something, to a researcher account or a configured dataset: a typo
    /// would otherwise create a budget that nobody can use.
    fn check_grantee(&self, g: &GrantRequest) -> Result<(), CoordinatorError> {
        if g.epsilon == 0.0 && g.delta == 0.0 && g.renewal_days.is_none() {
            return Err(CoordinatorError::InvalidArgument(
                "a grant of ε = 0 and δ = 0 changes nothing; give --epsilon (or --delta) above 0"
                    .into(),
            ));
        }
        match g.kind {
            BudgetKind::Researcher => match self.engine.ledger().user(&g.name)? {
                Some(u) if u.role == Role::Researcher => Ok(()),
                Some(_) => Err(CoordinatorError::InvalidArgument(format!(
                    "{} is a privacy officer, not a researcher; officers run no queries and have no budget",
                    g.name
                ))),
                None => Err(CoordinatorError::InvalidArgument(format!(
                    "no researcher named {:?}; check the name with `fedq user list`, or add them first with `fedq user add --name {}`",
                    log_safe(&g.name),
                    log_safe(&g.name)
                ))),
            },
            BudgetKind::Dataset => {
                if self.engine.datasets().iter().any(|d| d.name == g.name) {
                    Ok(())
                } else {
                    Err(CoordinatorError::InvalidArgument(format!(
                        "no dataset named {:?}; datasets are declared as [[datasets]] in coordinator.toml (`fedq policy show` lists them)",
                        log_safe(&g.name)
                    )))
                }
            }
        }
    }

    /// Count a failed login against the user name and the client address, log it and audit
    /// it (with the back-off or lockout it led to).
    fn login_failed(&self, shown: &str, user: &str, client: &str) {
        let f = self.throttle.failed(user, client);
        let held_back_secs = f.held_for.map(|d| d.as_secs().max(1));
        tracing::warn!(user = %shown, client, failures = f.failures, held_back_secs, locked = f.locked, outcome = "refused", "login failed");
        let event = AuditEvent::LoginFailed(LoginFailed {
            user: shown.to_string(),
            client: client.to_string(),
            failures: f.failures,
            held_back_secs: if f.locked { None } else { held_back_secs },
            locked: f.locked,
        });
        if let Err(e) = self.engine.ledger().record("coordinator", event) {
            tracing::error!(error = %e, "could not audit a failed login");
        }
    }

    /// Run a statement (a query, or a session statement) and return the FlightInfo whose
    /// ticket streams its result.
    /// An `EXPLAIN` or a query, planned and run.
    async fn run_statement(
        &self,
        researcher: &str,
        sql: &str,
    ) -> Result<(SchemaRef, Vec<RecordBatch>), Status> {
        if let Some(inner) = crate::explain::explain_target(sql)? {
            let r = self.engine.explain(researcher, inner).await?;
            return Ok((r.schema, r.batches));
        }
        let _slot = self.running.enter(researcher)?;
        let planned = self.engine.plan(researcher, sql).await.inspect_err(|e| {
            tracing::info!(researcher, error = %fedq_common::escape_log(&e.to_string()), "query refused at planning");
        })?;
        let released = self.engine.execute(researcher, &planned).await?;
        Ok((released.schema, released.batches))
    }

    async fn prepare(
        &self,
        researcher: &str,
        sql: &str,
        descriptor: FlightDescriptor,
    ) -> Result<FlightInfo, Status> {
        let (schema, batches) = if let Some(st) = parse_session_statement(sql)? {
            let text = self.engine.apply_session(researcher, &st)?;
            let schema = message_schema();
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(StringArray::from(vec![text]))],
            )
            .map_err(|_| Status::internal("could not build the result"))?;
            (schema, vec![batch])
        } else {
            // Every log line about the query, here, in the engine and in the ledger, carries
            // its id (recorded in this span once the planner has made it).
            let span = tracing::info_span!("query", researcher = %researcher, query_id = tracing::field::Empty);
            self.run_statement(researcher, sql).instrument(span).await?
        };
        let handle = self.stash(Pending {
            researcher: researcher.to_string(),
            schema: schema.clone(),
            batches,
            at: Instant::now(),
        });
        self.info_for(handle, &schema, descriptor)
    }
}

#[tonic::async_trait]
impl FlightSqlService for FedqFlightSqlService {
    type FlightService = FedqFlightSqlService;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>,
        Status,
    > {
        let Some(creds) = request.extensions().get::<BasicCredentials>().cloned() else {
            return Err(Status::unauthenticated(
                "log in with `authorization: Basic base64(user:password)` on the handshake; it returns a bearer token for every other call",
            ));
        };
        let client = request
            .remote_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|| "unknown".into());
        let shown = log_safe(&creds.user);
        // A held-back attempt is refused before its password is checked.
        if let Some(held) = self.throttle.check(&creds.user, &client) {
            tracing::warn!(user = %shown, client, outcome = "held back", "login held back after failed logins");
            return Err(CoordinatorError::Unauthenticated(held.message(&shown)).into());
        }
        let row = self.engine.ledger().user(&creds.user)?;
        let hash = row
            .as_ref()
            .map(|r| r.password_hash.clone())
            .unwrap_or_else(|| crate::auth::dummy_hash().to_string());
        // Argon2 is deliberately slow: verify off the async workers. Unknown users are
        // verified against a dummy hash so both cases take as long.
        let password = creds.password.clone();
        let matches =
            tokio::task::spawn_blocking(move || crate::auth::verify_password(&password, &hash))
                .await
                .map_err(|_| Status::internal("login failed; try again"))?;
        let user = match row {
            Some(u) if matches => u,
            _ => {
                self.login_failed(&shown, &creds.user, &client);
                return Err(CoordinatorError::Unauthenticated(
                    "wrong user name or password".into(),
                )
                .into());
            }
        };
        self.throttle.succeeded(&creds.user, &client);
        if user.disabled {
            tracing::warn!(user = %user.name, outcome = "refused", "login of a disabled user");
            return Err(CoordinatorError::Unauthenticated(format!(
                "the account {} is disabled; ask your privacy officer",
                user.name
            ))
            .into());
        }
        let token = self.sessions.issue(&user.name, user.role)?;
        tracing::info!(user = %user.name, role = user.role.as_str(), "login");
        let header: tonic::metadata::MetadataValue<_> = format!("Bearer {token}")
            .parse()
            .map_err(|_| Status::internal("could not encode the token"))?;
        let resp = HandshakeResponse {
            protocol_version: 0,
            payload: token.into_bytes().into(),
        };
        let mut response: Response<
            Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>,
        > = Response::new(Box::pin(stream::iter(vec![Ok(resp)])));
        response.metadata_mut().insert("authorization", header);
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let who = researcher(&request)?;
        let info = self
            .prepare(&who, &query.query, request.into_inner())
            .await?;
        Ok(Response::new(info))
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let who = researcher(&request)?;
        let sql = String::from_utf8(cmd.prepared_statement_handle.to_vec())
            .map_err(|_| Status::invalid_argument("invalid prepared statement handle"))?;
        let info = self.prepare(&who, &sql, request.into_inner()).await?;
        Ok(Response::new(info))
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        // Prepared statements carry the SQL text as their handle; nothing is planned or
        // charged until they are executed. Parameters are not supported.
        let _ = researcher(&request)?;
        let schema = if parse_session_statement(&query.query)?.is_some() {
            message_schema()
        } else if crate::explain::explain_target(&query.query)?.is_some() {
            crate::explain::explain_schema()
        } else {
            // Plan once to report errors early and give the client the result schema.
            let who = researcher(&request)?;
            let planned = self.engine.plan(&who, &query.query).await?;
            let mut fields: Vec<Field> = planned
                .plan
                .schema()
                .fields()
                .iter()
                .map(|f| f.as_ref().clone())
                .collect();
            if self.engine.policy().min_reported_count > 0 {
                fields.push(Field::new(
                    crate::release::SUPPRESSED_COLUMN,
                    DataType::Utf8,
                    true,
                ));
            }
            Arc::new(Schema::new(fields))
        };
        let ipc = arrow_flight::IpcMessage::try_from(arrow_flight::SchemaAsIpc::new(
            &schema,
            &Default::default(),
        ))
        .map_err(|_| Status::internal("could not encode the result schema"))?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: query.query.into_bytes().into(),
            dataset_schema: ipc.0,
            parameter_schema: Default::default(),
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        _request: Request<Action>,
    ) -> Result<(), Status> {
        Ok(())
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let who = researcher(&request)?;
        let handle = ticket.statement_handle.to_vec();
        let pending = {
            let mut map = self.pending();
            match map.get(&handle) {
                Some(p) if p.researcher == who => map.remove(&handle),
                _ => None,
            }
        };
        match pending {
            None => Err(Status::not_found(
                "unknown or already fetched result; run the query again (an identical query returns the same stored answer at no cost)",
            )),
            Some(p) => Ok(Response::new(encode_stream(p.schema, p.batches))),
        }
    }

    async fn do_put_statement_update(
        &self,
        ticket: CommandStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        let who = researcher(&request)?;
        match parse_session_statement(&ticket.query)? {
            Some(st) => {
                self.engine.apply_session(&who, &st)?;
                Ok(0)
            }
            None => Err(Status::invalid_argument(
                "fedq is read-only: updates are not accepted. Run SELECT aggregates as queries",
            )),
        }
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder(&self.sql_info).schema();
        metadata_info(&query, &schema, request.into_inner())
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let builder = query.into_builder(&self.sql_info);
        let schema = builder.schema();
        let batch = builder
            .build()
            .map_err(|_| Status::internal("could not build sql info"))?;
        Ok(Response::new(encode_stream(schema, vec![batch])))
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        metadata_info(&query, &schema, request.into_inner())
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let mut b = query.into_builder();
        b.append("fedq");
        let schema = b.schema();
        let batch = b
            .build()
            .map_err(|_| Status::internal("could not build catalogs"))?;
        Ok(Response::new(encode_stream(schema, vec![batch])))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        metadata_info(&query, &schema, request.into_inner())
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let mut b = query.into_builder();
        b.append("fedq", "public");
        let schema = b.schema();
        let batch = b
            .build()
            .map_err(|_| Status::internal("could not build schemas"))?;
        Ok(Response::new(encode_stream(schema, vec![batch])))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        metadata_info(&query, &schema, request.into_inner())
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let mut b = query.into_builder();
        for (name, spec) in &self.engine.catalog().tables {
            let schema = crate::planner::table_schema(spec);
            b.append("fedq", "public", name, "TABLE", &schema)
                .map_err(|_| Status::internal("could not build tables"))?;
        }
        let schema = b.schema();
        let batch = b
            .build()
            .map_err(|_| Status::internal("could not build tables"))?;
        Ok(Response::new(encode_stream(schema, vec![batch])))
    }

    async fn do_action_fallback(
        &self,
        request: Request<Action>,
    ) -> Result<Response<<Self as FlightService>::DoActionStream>, Status> {
        let action = request.get_ref().r#type.clone();
        let officer = request.extensions().get::<Officer>().map(|o| o.0.clone());
        if OFFICER_ACTIONS.contains(&action.as_str()) {
            let Some(officer) = officer else {
                let who = researcher(&request)?;
                // A denied officer action is audited, and changes nothing.
                self.engine.ledger().record(
                    &who,
                    AuditEvent::OfficerDenied(OfficerDenied {
                        action: action.clone(),
                        outcome: "denied".into(),
                    }),
                )?;
                return Err(CoordinatorError::Forbidden(format!(
                    "{action} needs the privacy-officer role; your token is a researcher's"
                ))
                .into());
            };
            let out = self.officer_action(&officer, request.get_ref())?;
            let body = serde_json::to_vec(&out)
                .map_err(|_| Status::internal("could not encode the answer"))?;
            let out = arrow_flight::Result { body: body.into() };
            return Ok(Response::new(Box::pin(stream::iter(vec![Ok(out)]))));
        }
        let body = match action.as_str() {
            ACTION_BUDGET => {
                let who = researcher(&request)?;
                let s = self.engine.budget(&who)?;
                serde_json::to_vec(&s).map_err(|_| Status::internal("could not encode budget"))?
            }
            ACTION_STATUS => {
                let infos = self.engine.node_info().await;
                let v: Vec<serde_json::Value> = infos
                    .into_iter()
                    .map(|(site, r)| match r {
                        Ok(i) => serde_json::json!({"site": site, "healthy": true,
                            "compatible": i.protocol_version == fedq_common::PROTOCOL_VERSION,
                            "info": i}),
                        Err(e) => serde_json::json!({"site": site, "healthy": false, "error": e}),
                    })
                    .collect();
                serde_json::to_vec(&v).map_err(|_| Status::internal("could not encode status"))?
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown action `{other}`; fedq supports {ACTION_BUDGET}, {ACTION_STATUS}, and for officers {}", OFFICER_ACTIONS.join(", ")
                )))
            }
        };
        let out = arrow_flight::Result { body: body.into() };
        Ok(Response::new(Box::pin(stream::iter(vec![Ok(out)]))))
    }

    async fn list_custom_actions(&self) -> Option<Vec<Result<ActionType, Status>>> {
        Some(vec![
            Ok(ActionType {
                r#type: ACTION_BUDGET.into(),
                description: "Your own privacy budget: granted, spent, remaining (JSON)".into(),
            }),
            Ok(ActionType {
                r#type: ACTION_STATUS.into(),
                description: "Health and version of each node (JSON)".into(),
            }),
            Ok(ActionType {
                r#type: ACTION_BUDGET_GRANT.into(),
                description: "Officers: add ε/δ to a researcher or dataset budget".into(),
            }),
            Ok(ActionType {
                r#type: ACTION_BUDGET_REVOKE.into(),
                description: "Officers: take back ε, or revoke a budget".into(),
            }),
            Ok(ActionType {
                r#type: ACTION_BUDGET_LIST.into(),
                description: "Officers: every budget (JSON)".into(),
            }),
            Ok(ActionType {
                r#type: ACTION_POLICY_SHOW.into(),
                description: "Officers: policy, datasets, catalog+policy hash (JSON)".into(),
            }),
            Ok(ActionType {
                r#type: ACTION_USER_ADD.into(),
                description: "Officers: add a researcher or officer with a password".into(),
            }),
            Ok(ActionType {
                r#type: ACTION_USER_DISABLE.into(),
                description: "Officers: disable a user; their tokens stop working".into(),
            }),
            Ok(ActionType {
                r#type: ACTION_USER_LIST.into(),
                description: "Officers: every user, role and state (JSON)".into(),
            }),
        ])
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_researcher_runs_at_most_the_limit_at_once() {
        let r = Arc::new(RunningQueries::new(2));
        let a1 = r.enter("alice").unwrap();
        let _a2 = r.enter("alice").unwrap();
        assert!(matches!(
            r.enter("alice"),
            Err(CoordinatorError::TooManyQueries(2))
        ));
        // Others are not affected.
        let _b = r.enter("bob").unwrap();
        drop(a1);
        let _a3 = r.enter("alice").unwrap();
        // Its own status and words, not a budget's: nothing was charged, retry shortly.
        let s: Status = r.enter("alice").err().unwrap().into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.message().contains("Retry shortly"), "{}", s.message());
        assert!(
            s.message().contains("nothing was charged"),
            "{}",
            s.message()
        );
    }
}
