//! The control socket's protocol: a request is one [`Request`] as a JSON
//! line; the answer is one JSON document, either the request's result or
//! `{"error": "..."}`. The CLI and the daemon share these types, so a
//! request the CLI can build is one the daemon can read.

use serde::{Deserialize, Serialize};
use std::net::IpAddr;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// The instance's [`crate::status::Status`].
    Show,
    /// Re-read the configuration file and apply it live.
    Reload,
    /// A question about routes.
    Route { query: RouteQuery },
    /// Can this box carry traffic? A [`crate::health::Health`]. Limits
    /// left out take the daemon's defaults.
    Health {
        /// At least one peer completed a handshake within this many
        /// seconds (checked only when given).
        #[serde(default)]
        handshake_within_secs: Option<u64>,
        /// Longest a worker's loop may stand still, in milliseconds.
        #[serde(default)]
        stall_ms: Option<u64>,
    },
    /// [Export]: withdraw every exported route and export nothing until
    /// undone (`undo`), so that the routers move away before maintenance.
    Drain {
        #[serde(default)]
        undo: bool,
    },
    /// `subway capture`: answered with a JSON line, then pcapng
    /// (capture.rs).
    Capture(crate::capture::CaptureRequest),
}

/// `subway route ...`: the CLI's subcommands are the protocol's queries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, clap::Subcommand)]
#[serde(tag = "query", rename_all = "snake_case")]
pub enum RouteQuery {
    /// Every route, or those of one VNET.
    List {
        #[arg(long)]
        vnet: Option<String>,
    },
    /// The route (and peer) serving ADDRESS, and the less specific routes
    /// that would match next.
    Get {
        address: IpAddr,
        #[arg(long, default_value = "default")]
        vnet: String,
    },
    /// Every pair of overlapping prefixes, with their VNETs and owners.
    Overlaps,
    /// What the gateway would do with a packet, step by step: the XDP
    /// program and the workers' own decision functions run on the probe's
    /// bytes (nothing is sent), including why it would be dropped.
    Explain {
        #[arg(long, default_value = "default")]
        vnet: String,
        #[arg(long)]
        src: IpAddr,
        #[arg(long)]
        dst: IpAddr,
        /// tcp (a SYN), udp or icmp (an echo request).
        #[arg(long)]
        proto: Option<String>,
        #[arg(long)]
        port: Option<u16>,
        /// TTL or hop limit as it arrives.
        #[arg(long, default_value_t = 64)]
        #[serde(default = "default_ttl")]
        ttl: u8,
        /// IP total length in bytes (default: just the headers).
        #[arg(long)]
        #[serde(default)]
        size: Option<usize>,
        /// An 802.1Q tag on the frame.
        #[arg(long)]
        #[serde(default)]
        vlan: Option<u16>,
        /// Where it arrives: a [Lan] interface, or a peer's public key
        /// (default: where its source lives in the VNET).
        #[arg(long)]
        #[serde(default)]
        from: Option<String>,
    },
}

fn default_ttl() -> u8 {
    64
}

impl Request {
    /// The request as sent: one line.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("requests serialize")
    }

    pub fn parse(line: &str) -> Result<Request, String> {
        serde_json::from_str(line).map_err(|e| format!("not a subway request ({e}): {line:?}"))
    }
}

/// The answer to a request that failed.
pub fn error(msg: impl std::fmt::Display) -> serde_json::Value {
    serde_json::json!({ "error": msg.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_one_json_line_and_garbage_is_refused() {
        for r in [
            Request::Show,
            Request::Reload,
            Request::Route {
                query: RouteQuery::Get {
                    address: "10.1.0.2".parse().unwrap(),
                    vnet: "blue".into(),
                },
            },
            Request::Health {
                handshake_within_secs: Some(180),
                stall_ms: None,
            },
            Request::Health {
                handshake_within_secs: None,
                stall_ms: Some(250),
            },
            Request::Drain { undo: true },
            Request::Capture(crate::capture::CaptureRequest {
                interface: Some("wan0".into()),
                side: crate::capture::Side::Outer,
                count: Some(10),
                filter: "udp port 51820".into(),
                ..Default::default()
            }),
            Request::Route {
                query: RouteQuery::Explain {
                    vnet: "default".into(),
                    src: "10.1.0.2".parse().unwrap(),
                    dst: "fd02::1".parse().unwrap(),
                    proto: Some("tcp".into()),
                    port: None,
                    ttl: 1,
                    size: Some(1500),
                    vlan: None,
                    from: Some("lan0".into()),
                },
            },
        ] {
            let line = r.to_line();
            assert!(!line.contains('\n'));
            assert_eq!(Request::parse(&line), Ok(r));
        }
        assert_eq!(Request::parse(r#"{"request":"show"}"#), Ok(Request::Show));
        // A line without the optional limits (a script's, or an older CLI's).
        assert_eq!(
            Request::parse(r#"{"request":"health"}"#),
            Ok(Request::Health {
                handshake_within_secs: None,
                stall_ms: None
            })
        );
        assert!(Request::parse("show").is_err());
        assert!(Request::parse(r#"{"request":"route","query":{"query":"get","address":"x"}}"#).is_err());
    }
}
