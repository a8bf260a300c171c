//! A minimal Arrow Flight SQL client for fedq, keeping gRPC status codes.

use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt};
use arrow_flight::{Action, FlightDescriptor, HandshakeRequest};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use futures::TryStreamExt;
use prost::Message;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::CliError;

/// Adds the bearer token to every call.
#[derive(Clone)]
struct BearerAuth(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Inner = FlightServiceClient<InterceptedService<Channel, BearerAuth>>;

/// A connected client.
pub struct FedqClient {
    inner: Inner,
}

/// A query's result.
#[derive(Debug, Clone)]
pub struct QueryResult {
    /// Schema, with fedq's metadata.
    pub schema: SchemaRef,
    /// Batches.
    pub batches: Vec<RecordBatch>,
}

impl FedqClient {
    /// Connect to `url` (e.g. `http://127.0.0.1:31050`) and log in with a user name and
    /// password: the Flight handshake with Basic credentials returns a bearer token that
    /// every later call carries.
    pub async fn connect(url: &str, user: &str, password: &str) -> Result<FedqClient, CliError> {
        Self::connect_with_ca(url, None, user, password).await
    }

    /// [`FedqClient::connect`] to a coordinator whose endpoint may use TLS
    /// (`https://` or `grpc+tls://`): its certificate must chain to `ca` (PEM).
    pub async fn connect_with_ca(
        url: &str,
        ca: Option<&[u8]>,
        user: &str,
        password: &str,
    ) -> Result<FedqClient, CliError> {
        let channel = open_channel(url, ca).await?;
        let token = login(channel.clone(), user, password).await?;
        Self::with_channel(channel, &token)
    }

    /// Connect with a bearer token obtained earlier (see [`login`]).
    pub async fn connect_with_token(url: &str, token: &str) -> Result<FedqClient, CliError> {
        let channel = open_channel(url, None).await?;
        Self::with_channel(channel, token)
    }

    fn with_channel(channel: Channel, token: &str) -> Result<FedqClient, CliError> {
        let value: MetadataValue<_> = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| CliError::User("the token contains invalid characters".into()))?;
        let inner = FlightServiceClient::with_interceptor(channel, BearerAuth(value))
            .max_decoding_message_size(256 * 1024 * 1024);
        Ok(FedqClient { inner })
    }

    /// Run one SQL statement (a query or `SET fedq.epsilon = ...`).
    pub async fn query(&mut self, sql: &str) -> Result<QueryResult, CliError> {
        let cmd = CommandStatementQuery {
            query: sql.to_string(),
            transaction_id: None,
        };
        let desc = FlightDescriptor::new_cmd(cmd.as_any().encode_to_vec());
        let info = self.inner.get_flight_info(desc).await?.into_inner();
        let mut batches = Vec::new();
        let mut schema = None;
        for ep in info.endpoint.clone() {
            let Some(ticket) = ep.ticket else { continue };
            let resp = self.inner.do_get(ticket).await?.into_inner();
            let mut stream = FlightRecordBatchStream::new_from_flight_data(
                resp.map_err(|s| FlightError::Tonic(Box::new(s))),
            );
            while let Some(b) = stream.try_next().await.map_err(flight_err)? {
                batches.push(b);
            }
            if schema.is_none() {
                schema = stream.schema().cloned();
            }
        }
        let schema = match schema {
            Some(s) => s,
            None => std::sync::Arc::new(
                info.try_decode_schema()
                    .map_err(|e| CliError::User(format!("bad schema from server: {e}")))?,
            ),
        };
        Ok(QueryResult { schema, batches })
    }

    /// Run a fedq Flight action and return its JSON body.
    pub async fn action(&mut self, name: &str) -> Result<serde_json::Value, CliError> {
        self.action_with_body(name, None).await
    }

    /// Run a fedq Flight action with a JSON body and return its JSON answer.
    pub async fn action_with_body(
        &mut self,
        name: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, CliError> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut s = self
            .inner
            .do_action(Action::new(name.to_string(), body))
            .await?
            .into_inner();
        let first = s
            .message()
            .await?
            .ok_or_else(|| CliError::User(format!("empty answer to {name}")))?;
        serde_json::from_slice(&first.body)
            .map_err(|e| CliError::User(format!("bad answer to {name}: {e}")))
    }
}

async fn open_channel(url: &str, ca: Option<&[u8]>) -> Result<Channel, CliError> {
    // ADBC spells the schemes grpc:// and grpc+tls://.
    let dial = if let Some(rest) = url.strip_prefix("grpc+tls://") {
        format!("https://{rest}")
    } else if let Some(rest) = url.strip_prefix("grpc://") {
        format!("http://{rest}")
    } else {
        url.to_string()
    };
    let mut endpoint = Channel::from_shared(dial.clone())
        .map_err(|e| CliError::User(format!("invalid coordinator URL {url:?}: {e}")))?;
    if dial.starts_with("https://") {
        let Some(ca) = ca else {
            return Err(CliError::User(format!(
                "{url} uses TLS: pass --ca FILE (or FEDQ_CA) with the CA that issued the coordinator's certificate"
            )));
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        endpoint = endpoint
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
            )
            .map_err(|e| CliError::User(format!("TLS setup for {url}: {e}")))?;
    }
    endpoint.connect().await.map_err(|e| {
        CliError::User(format!(
            "cannot connect to the coordinator at {url}: {e}; is `fedq coordinator` running there?"
        ))
    })
}

/// Log in over `channel`: the Flight handshake with `authorization: Basic` returns the
/// bearer token in the `authorization` response header.
pub async fn login(channel: Channel, user: &str, password: &str) -> Result<String, CliError> {
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut req = Request::new(futures::stream::iter([HandshakeRequest::default()]));
    req.metadata_mut().insert(
        "authorization",
        format!("Basic {basic}")
            .parse()
            .map_err(|_| CliError::User("the user name contains invalid characters".into()))?,
    );
    let resp = FlightServiceClient::new(channel).handshake(req).await?;
    let header = resp
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // Drain the (one-message) stream so the call completes cleanly.
    let mut stream = resp.into_inner();
    while stream.message().await?.is_some() {}
    header
        .as_deref()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string())
        .ok_or_else(|| CliError::User("the coordinator did not return a token at login".into()))
}

fn flight_err(e: FlightError) -> CliError {
    match e {
        FlightError::Tonic(s) => CliError::from(*s),
        other => CliError::User(format!("bad result stream: {other}")),
    }
}
