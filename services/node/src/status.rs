//! `sovereign ring status`: a node's `/health` over its API (HTTPS checked
//! against the cluster CA, or plain HTTP on a dev host), as a table.

use std::path::Path;
use std::sync::Arc;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde_json::Value;
use sovereign_identity::ClusterCa;

/// Why the status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// A bad URL or CA file.
    #[error("{0}")]
    Setup(String),
    /// The node could not be reached or did not answer well.
    #[error("{url}: {message}")]
    Request {
        /// The URL asked.
        url: String,
        /// What went wrong.
        message: String,
    },
}

/// Asks `url` (`http://HOST:PORT` or `https://HOST:PORT`) for `/health` with
/// the bearer `key`; HTTPS is checked against the PEM CA `cacert`.
pub async fn fetch(url: &str, key: &str, cacert: Option<&Path>) -> Result<Value, StatusError> {
    let failed = |message: String| StatusError::Request {
        url: url.to_owned(),
        message,
    };
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| StatusError::Setup(format!("--api {url:?}: {e}")))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(StatusError::Setup(format!(
                "--api {url:?}: use http:// or https://"
            )))
        }
    };
    let host = uri
        .host()
        .ok_or_else(|| StatusError::Setup(format!("--api {url:?} has no host")))?
        .trim_matches(['[', ']'])
        .to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| failed(e.to_string()))?;
    let request = hyper::Request::get("/health")
        .header("host", format!("{host}:{port}"))
        .header("authorization", format!("Bearer {key}"))
        .body(Empty::<Bytes>::new())
        .map_err(|e| StatusError::Setup(e.to_string()))?;
    let response = if tls {
        let connector = tokio_rustls::TlsConnector::from(client_config(cacert)?);
        let name = ServerName::try_from(host.clone())
            .map_err(|e| StatusError::Setup(format!("{host}: {e}")))?;
        let stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| failed(format!("TLS: {e}")))?;
        send(TokioIo::new(stream), request).await
    } else {
        send(TokioIo::new(tcp), request).await
    }
    .map_err(failed)?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| failed(e.to_string()))?
        .to_bytes();
    // A node without a model yet answers 503 with its status.
    if !status.is_success() && status != hyper::StatusCode::SERVICE_UNAVAILABLE {
        return Err(failed(format!("HTTP {status}")));
    }
    serde_json::from_slice(&body).map_err(|e| failed(format!("not JSON: {e}")))
}

async fn send<T>(
    io: TokioIo<T>,
    request: hyper::Request<Empty<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())
}

fn client_config(
    cacert: Option<&Path>,
) -> Result<Arc<tokio_rustls::rustls::ClientConfig>, StatusError> {
    let path = cacert.ok_or_else(|| {
        StatusError::Setup("an https:// API needs --cacert (the cluster CA certificate)".into())
    })?;
    let ca = ClusterCa::load(path).map_err(|e| StatusError::Setup(e.to_string()))?;
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots
        .add(ca.certificate_der().clone())
        .map_err(|e| StatusError::Setup(format!("{}: {e}", path.display())))?;
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(
        sovereign_identity::tls::provider(),
    )
    .with_protocol_versions(&[&tokio_rustls::rustls::version::TLS13])
    .map_err(|e| StatusError::Setup(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// [`fetch`] from a synchronous caller (the CLI).
pub fn fetch_blocking(url: &str, key: &str, cacert: Option<&Path>) -> Result<Value, StatusError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StatusError::Setup(e.to_string()))?
        .block_on(fetch(url, key, cacert))
}

/// The status as lines for a terminal: the ring (and a switch of version
/// waiting for answers in flight), one line per member (its layers, budget
/// and the model versions it holds), then this node's replication
/// (transfers with progress, refusals).
pub fn render(health: &Value) -> String {
    let ring = &health["ring"];
    let mut out = format!(
        "node {}: {}\n",
        health["node"].as_str().unwrap_or("?"),
        if ring["serving"].as_bool() == Some(true) {
            format!(
                "serving {}@{} on {} node(s), kernels {}",
                health["model"].as_str().unwrap_or("?"),
                ring["version"].as_str().unwrap_or("?"),
                ring["order"].as_array().map_or(0, Vec::len),
                ring["isa"].as_str().unwrap_or("?")
            )
        } else {
            format!(
                "not serving: {}",
                ring["problem"].as_str().unwrap_or("no plan")
            )
        }
    );
    if let Some(switch) = ring["switch"].as_object() {
        let waiting = strings(&switch["waiting_for"]);
        out.push_str(&format!(
            "moving to {} for {} s: {}, {} request(s) held here\n",
            switch["to"].as_str().unwrap_or("?"),
            switch["seconds"].as_u64().unwrap_or(0),
            if waiting.is_empty() {
                "no answer in flight".to_owned()
            } else {
                format!("answers in flight on {}", waiting.join(","))
            },
            switch["held"].as_u64().unwrap_or(0)
        ));
    }
    out.push_str(&format!(
        "{:<16} {:<9} {:>11} {:<8} {}\n",
        "NODE", "LAYERS", "BUDGET", "ISA", "MODELS"
    ));
    for m in health["members"].as_array().into_iter().flatten() {
        let layers = m["layers"]
            .as_array()
            .map(|r| format!("{}..{}", r[0], r[1]))
            .unwrap_or_else(|| "-".into());
        let models = strings(&m["models"]);
        out.push_str(&format!(
            "{:<16} {:<9} {:>7} MiB {:<8} {}",
            m["name"].as_str().unwrap_or("?"),
            layers,
            m["memory_budget_mb"].as_u64().unwrap_or(0),
            m["isa"].as_str().unwrap_or("?"),
            models.join(",")
        ));
        if let Some(reason) = m["left_out"].as_str() {
            out.push_str(&format!("  (left out: {reason})"));
        }
        out.push('\n');
    }
    out.push_str(&render_replication(&health["replication"]));
    out
}

/// The strings of a JSON array (none for anything else).
fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// This node's replication: the spool, transfers in progress, refusals.
fn render_replication(replication: &Value) -> String {
    let Some(r) = replication.as_object() else {
        return String::new();
    };
    let mib = |v: &Value| v.as_u64().unwrap_or(0) as f64 / f64::from(1 << 20);
    let spooled = strings(&r["spooled"]);
    let mut out = format!(
        "replication: spool {:.1} of {:.0} MiB{}\n",
        mib(&r["spool_bytes"]),
        mib(&r["spool_capacity"]),
        if spooled.is_empty() {
            String::new()
        } else {
            format!(", passing on {}", spooled.join(","))
        }
    );
    for t in r["transfers"].as_array().into_iter().flatten() {
        let (received, total) = (mib(&t["received"]), mib(&t["total"]));
        out.push_str(&format!(
            "  receiving {} from {}: {received:.1} of {total:.1} MiB ({:.0}%)\n",
            t["item"].as_str().unwrap_or("?"),
            t["from"].as_str().unwrap_or("?"),
            if total > 0.0 {
                100.0 * received / total
            } else {
                100.0
            }
        ));
    }
    for f in r["refusals"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  refused {} ({}): {}\n",
            f["item"].as_str().unwrap_or("?"),
            f["node"].as_str().unwrap_or("?"),
            f["reason"].as_str().unwrap_or("?")
        ));
    }
    for item in strings(&r["relayed_unopened"]) {
        out.push_str(&format!(
            "  relaying {item} unopened (no identity opens it)\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_switch_of_version_is_shown_with_whom_it_waits_for() {
        let health = serde_json::json!({
            "node": "node-b", "model": "smollm2",
            "ring": {"serving": true, "version": "1.0.0", "order": ["node-a", "node-b"], "isa": "avx2",
                     "switch": {"to": "2.0.0", "waiting_for": ["node-a"], "seconds": 3, "held": 1}},
            "members": [],
        });
        let shown = render(&health);
        assert!(
            shown.contains("serving smollm2@1.0.0 on 2 node(s)"),
            "{shown}"
        );
        assert!(
            shown.contains(
                "moving to 2.0.0 for 3 s: answers in flight on node-a, 1 request(s) held here"
            ),
            "{shown}"
        );
    }
}
