//! The general MQTT broker: ordinary pub/sub for clients that are not devices (retained
//! messages, wills, QoS 0/1/2, clean and persistent sessions, MQTT 5 properties), served by
//! rumqttd's router and its v4 and v5 servers on loopback ports of their own. The front
//! reads such a client's CONNECT itself (limits, deadline, whether anonymous clients are
//! allowed at all), then relays the connection to rumqttd's server for its protocol level,
//! checking each packet the client sends on the way: the device namespace (`$oc/...`) is
//! not theirs to publish or subscribe in.
//!
//! rumqttd keeps its state in memory: retained messages and persistent sessions live as long
//! as the node process (as with mosquitto without persistence).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::time::Duration;

use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::{ConnectionSettings, Router, RouterConfig, Server, ServerSettings};

/// The device namespace: reserved for devices, whatever a general client asks.
pub const DEVICE_NAMESPACE: &str = "$oc/";

/// Whether a general client may use `topic` (a topic or a filter).
pub fn general_topic_allowed(topic: &str) -> bool {
    !topic.starts_with(DEVICE_NAMESPACE) && topic != "$oc"
}

/// rumqttd running inside this node.
#[derive(Debug, Clone, Copy)]
pub struct GeneralBroker {
    v4: SocketAddr,
    v5: SocketAddr,
}

impl GeneralBroker {
    /// Starts rumqttd's router and its servers (on threads of their own, as rumqttd runs
    /// them) listening on free loopback ports; `max_packet` caps payloads as the front does.
    pub fn start(max_packet: usize, max_connections: usize) -> std::io::Result<Self> {
        let v4 = free_loopback_port()?;
        let v5 = free_loopback_port()?;
        let router = Router::new(
            0,
            RouterConfig {
                max_connections: max_connections.max(1),
                max_outgoing_packet_count: 200,
                max_segment_size: 16 << 20,
                max_segment_count: 4,
                ..RouterConfig::default()
            },
        );
        let router_tx = router.spawn();
        for (name, addr, v5_protocol) in [("aq-general-v4", v4, false), ("aq-general-v5", v5, true)]
        {
            let settings = ServerSettings {
                name: name.to_string(),
                listen: addr,
                tls: None,
                next_connection_delay_ms: 0,
                connections: ConnectionSettings {
                    // The front already waited for the CONNECT; this one is relayed at once.
                    connection_timeout_ms: 5_000,
                    max_payload_size: max_packet,
                    max_inflight_count: 100,
                    auth: None,
                    external_auth: None,
                    dynamic_filters: true,
                },
            };
            let router_tx = router_tx.clone();
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start the general MQTT broker");
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        let outcome = if v5_protocol {
                            Server::new(settings, router_tx, V5)
                                .start(rumqttd::LinkType::Remote)
                                .await
                        } else {
                            Server::new(settings, router_tx, V4)
                                .start(rumqttd::LinkType::Remote)
                                .await
                        };
                        if let Err(e) = outcome {
                            tracing::error!(error = %e, "the general MQTT broker stopped");
                        }
                    });
                })?;
        }
        Ok(Self { v4, v5 })
    }

    /// Where the relay connects for a client of this protocol level.
    pub fn addr(&self, v5: bool) -> SocketAddr {
        if v5 { self.v5 } else { self.v4 }
    }

    /// Connects to rumqttd's server for this protocol level (it may still be starting).
    pub async fn connect(&self, v5: bool) -> std::io::Result<tokio::net::TcpStream> {
        let addr = self.addr(v5);
        let mut last = None;
        for _ in 0..50 {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no connection")))
    }
}

fn free_loopback_port() -> std::io::Result<SocketAddr> {
    let l = StdListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    l.local_addr()
}

/// SUBSCRIBEs forwarded without some of their filters: packet id → (positions refused, how
/// many filters the client asked for), so rumqttd's SUBACK can be given back their codes.
#[derive(Debug, Default)]
pub struct Splices {
    pending: HashMap<u16, (Vec<usize>, usize)>,
}

impl Splices {
    pub fn insert(&mut self, pkid: u16, refused: Vec<usize>, asked: usize) {
        self.pending.insert(pkid, (refused, asked));
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn take(&mut self, pkid: u16) -> Option<(Vec<usize>, usize)> {
        self.pending.remove(&pkid)
    }
}

/// Puts `failure` back at the `refused` positions of a SUBACK's codes for `asked` filters.
pub fn splice_codes<T: Clone>(
    granted: Vec<T>,
    refused: &[usize],
    asked: usize,
    failure: T,
) -> Vec<T> {
    let mut granted = granted.into_iter();
    (0..asked)
        .map(|i| {
            if refused.contains(&i) {
                failure.clone()
            } else {
                granted.next().unwrap_or_else(|| failure.clone())
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_namespace_is_not_for_general_clients() {
        assert!(general_topic_allowed("sensors/1/temp"));
        assert!(general_topic_allowed("#"));
        assert!(general_topic_allowed("$SYS/uptime"));
        assert!(!general_topic_allowed("$oc/devices/d1/sys/messages/down"));
        assert!(!general_topic_allowed("$oc/#"));
        assert!(!general_topic_allowed("$oc"));
    }

    #[test]
    fn refused_filters_get_their_failure_code_back_in_place() {
        assert_eq!(splice_codes(vec![1, 0], &[1], 3, 0x87), vec![1, 0x87, 0]);
        assert_eq!(
            splice_codes(Vec::<u8>::new(), &[0, 1], 2, 0x80),
            vec![0x80, 0x80]
        );
        assert_eq!(splice_codes(vec![2], &[], 1, 0x80), vec![2]);
    }
}
